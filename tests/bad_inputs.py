"""Bad input, as data: every case is a command line that must be refused with one line on stderr, exit code
2, no traceback and nothing written. tests/test_bad_inputs.py runs each as a subprocess, in a folder holding
the files below, with these words in the command replaced: {out} is where the command would write (it must
not exist afterwards), {repo} the repository."""

from __future__ import annotations

import copy
import json
from typing import NamedTuple


class Case(NamedTuple):
    name: str
    command: list[str]
    """python -m COMMAND[0] COMMAND[1:]"""
    fragment: str | tuple[str, ...]
    """Text (or texts) the error line must contain."""
    unless_installed: str | None = None
    """A module whose presence makes the input good (the case is then skipped)."""


def files(result: dict) -> dict[str, str | bytes]:
    """The case folder's files, relative paths to contents, made from one good results document."""
    good = json.dumps(result, indent=2)

    def changed(**fields) -> str:
        document = copy.deepcopy(result)
        for key, value in fields.items():
            if value is _DROP:
                del document[key]
            else:
                document[key] = value
        return json.dumps(document)

    named = copy.deepcopy(result)
    named["run"]["world_size"] = "eight"
    record = {"prompt": "Say hi.", "response": "Hi."}
    shaped_like_a_row = "MODEL=tiny\nMETHOD=fsdp\nGPUS={gpus}\nBATCH=4\nGRAD_CKPT=True\n"
    return {
        "afile": "a file where a folder is expected\n",
        "good/results.json": good,
        "results/trunc/results.json": good[: len(good) // 2],
        "results/nonjson/results.json": "status: ok\n",
        "results/empty/results.json": "",
        "results/list/results.json": json.dumps([result]),
        "results/no_run/results.json": changed(run=_DROP),
        "results/no_loss/results.json": changed(loss=_DROP),
        "results/bad_status/results.json": changed(status="finished"),
        "results/error_no_failure/results.json": changed(status="error", failure=None),
        "results/v99/results.json": changed(schema_version=99),
        "results/world_size/results.json": json.dumps(named),
        "results/twice/full/tiny_fsdp_2cpu_bs4/results.json": good,
        "results/twice/probe5/tiny_fsdp_2cpu_bs4/results.json": good,
        "results/none/notes.txt": "no results here\n",
        "data/good.json": json.dumps([record, record, record, record]),
        "data/no_response.json": json.dumps([{"prompt": "Say hi.", "answer": "Hi."}] * 4),
        "data/not_a_list.json": json.dumps(record),
        "data/not_utf8.jsonl": json.dumps(record).encode() + b"\n" + b'{"prompt": "caf\xe9", "response": "x"}\n',
        "tokenizer_empty/README.md": "a folder without a tokenizer\n",
        "checkpoint_unfinished/checkpoint-3/model.pt": "cut short\n",
        "model_no_shape/config.json": json.dumps({"model_type": "llama", "hidden_size": 64}),
        "model_odd_heads/config.json": json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
                                                   "num_hidden_layers": 2, "num_attention_heads": 3, "vocab_size": 256,
                                                   "max_position_embeddings": 64}),
        "recipes/latin1.env": b"MODEL=tiny\n# caf\xe9\nMETHOD=fsdp\n",
        "recipes/tiny_fsdp_2cpu_bs4.env": shaped_like_a_row.format(gpus=4),
        "recipes/epochs_inf.env": shaped_like_a_row.format(gpus=2) + "EPOCHS=inf\n",
        "recipes/unknown_key.env": shaped_like_a_row.format(gpus=2) + "LR=1e-3\n",
    }


_DROP = object()

TRAIN = ["shardkit.train", "--fsdp", "full_shard auto_wrap", "--nproc_per_node", "2", "--output_dir", "{out}"]
DATA = [*TRAIN, "--per_device_train_batch_size", "1"]
RUN = ["shardkit", "run", "tiny_fsdp_2cpu_bs4", "--results", "{out}"]
REPRODUCE = ["shardkit", "reproduce", "tiny_fsdp_2cpu_bs4", "--results", "{out}"]
PLAN = ["shardkit", "plan", "--model", "llama-7b", "--gpus", "4"]
NOT_JSON = "not valid JSON"

CASES = [
    # python -m shardkit.train: values of the run
    Case("epochs-inf", [*TRAIN, "--num_train_epochs", "inf"], "--num_train_epochs 'inf': Input should be a finite"),
    Case("epochs-nan", [*TRAIN, "--num_train_epochs", "nan"], "--num_train_epochs 'nan'"),
    Case("lr-inf", [*TRAIN, "--learning_rate", "inf"], "--learning_rate 'inf': Input should be a finite"),
    Case("lr-word", [*TRAIN, "--learning_rate", "fast"], "--learning_rate 'fast'"),
    Case("batch-0", [*TRAIN, "--per_device_train_batch_size", "0"], "--per_device_train_batch_size '0'"),
    Case("gpu-cap-0", [*TRAIN, "--max_gpu_memory", "0"], "--max_gpu_memory '0'"),
    Case("bool-maybe", [*TRAIN, "--bf16", "maybe"], "--bf16 'maybe'"),
    Case("heads", [*TRAIN, "--num_attention_heads", "5"],
         "--num_attention_heads 5 (the tiny preset): hidden size 64 is not a multiple of the 5 attention heads"),
    Case("odd-head-size", [*TRAIN, "--hidden_size", "60"], "head size 15 is odd"),
    Case("flash-attn", [*TRAIN, "--attn_implementation", "flash_attention_2"],
         "--attn_implementation flash_attention_2: the flash_attn package is not installed", "flash_attn"),
    Case("attn-unknown", [*TRAIN, "--attn_implementation", "flash"], "--attn_implementation 'flash'"),
    Case("stack-unknown", [*TRAIN, "--stack", "2022"], "--stack '2022'"),
    Case("stack-2023-zero3", ["shardkit.train", "--deepspeed", "{repo}/recipes/configs/zero3_no_offload.json",
                              "--stack", "2023", "--output_dir", "{out}"], "--stack 2023 emulates the table's FSDP1"),
    Case("model", [*TRAIN, "--model_name_or_path", "llama-3b"], "--model_name_or_path 'llama-3b': not a catalogued model"),
    Case("model-config-incomplete", [*TRAIN, "--model_name_or_path", "model_no_shape"],
         "model_no_shape/config.json: no integer intermediate_size, num_hidden_layers, num_attention_heads, vocab_size"),
    Case("model-config-heads", [*TRAIN, "--model_name_or_path", "model_odd_heads"],
         "model_odd_heads/config.json: hidden size 64 is not a multiple of the 3 attention heads"),
    Case("nproc-0", [*TRAIN, "--nproc_per_node", "0"], "--nproc_per_node 0: must be at least 1"),
    Case("nproc-word", [*TRAIN, "--nproc_per_node", "two"], "argument --nproc_per_node: invalid int value: 'two'"),
    Case("too-few-examples", [*TRAIN, "--num_examples", "1"], "2 ranks but only 1 examples"),
    Case("unknown-flag", [*TRAIN, "--frobnicate", "1"], "unknown flag '--frobnicate'"),
    Case("fsdp-and-deepspeed", [*TRAIN, "--deepspeed", "{repo}/recipes/configs/deepspeed_config.json"],
         "--fsdp and --deepspeed are exclusive"),
    Case("deepspeed-json", [*TRAIN, "--fsdp", "", "--deepspeed", "{repo}/tests/data/broken.json"],
         "tests/data/broken.json:4:"),
    # python -m shardkit.train: where it writes
    Case("output-is-file", [*TRAIN, "--output_dir", "afile"], "--output_dir 'afile': is a file, not a folder"),
    Case("output-below-file", [*TRAIN, "--output_dir", "afile/run"], "afile is a file, not a folder"),
    Case("output-in-proc", [*TRAIN, "--output_dir", "/proc/shardkit-run"],
         "--output_dir '/proc/shardkit-run': cannot write in /proc"),
    # python -m shardkit.train: what the ranks used to find out
    Case("data-missing", [*DATA, "--data_path", "data/missing.json", "--tokenizer_path", "tokenizer_empty"],
         "--data_path 'data/missing.json': no such file"),
    Case("data-keys", [*DATA, "--data_path", "data/no_response.json", "--tokenizer_path", "tokenizer_empty"],
         'data/no_response.json: record 1: "response" is missing'),
    Case("data-not-list", [*DATA, "--data_path", "data/not_a_list.json", "--tokenizer_path", "tokenizer_empty"],
         "data/not_a_list.json: expected a JSON list"),
    Case("data-not-utf8", [*DATA, "--data_path", "data/not_utf8.jsonl", "--tokenizer_path", "tokenizer_empty"],
         "data/not_utf8.jsonl:2: not UTF-8 text"),
    Case("data-no-tokenizer", [*DATA, "--data_path", "data/good.json"], "--data_path needs --tokenizer_path"),
    Case("tokenizer-missing", [*DATA, "--data_path", "data/good.json", "--tokenizer_path", "no_tokenizer"],
         "--tokenizer_path 'no_tokenizer': no such folder"),
    Case("tokenizer-unloadable", [*DATA, "--data_path", "data/good.json", "--tokenizer_path", "tokenizer_empty"],
         "--tokenizer_path 'tokenizer_empty': cannot load a local tokenizer"),
    Case("resume-missing", [*TRAIN, "--resume_from_checkpoint", "no_checkpoint"],
         "--resume_from_checkpoint 'no_checkpoint': no such folder"),
    Case("resume-unfinished", [*TRAIN, "--resume_from_checkpoint", "checkpoint_unfinished/checkpoint-3"],
         "not a finished shardkit checkpoint"),
    Case("resume-latest-none", [*TRAIN, "--resume_from_checkpoint", "latest"],
         "--resume_from_checkpoint latest: no finished checkpoint in"),
    # shardkit run / reproduce: flags and recipes
    Case("probe-negative", [*RUN, "--probe", "-3"], "argument --probe: '-3': must be at least 1"),
    Case("probe-0", [*RUN, "--probe", "0"], "argument --probe: '0': must be at least 1"),
    Case("run-timeout-negative", [*RUN, "--timeout", "-5"], "argument --timeout: '-5': a time limit must be more"),
    Case("run-timeout-nan", [*RUN, "--timeout", "nan"], "argument --timeout: 'nan': must be a finite number"),
    Case("results-is-file", ["shardkit", "run", "tiny_fsdp_2cpu_bs4", "--results", "afile"],
         "argument --results: 'afile': is a file, not a folder"),
    Case("results-in-proc", ["shardkit", "run", "tiny_fsdp_2cpu_bs4", "--results", "/proc/shardkit-results"],
         "argument --results: '/proc/shardkit-results': cannot write in /proc"),
    Case("run-override-inf", [*RUN, "--num_train_epochs", "inf"],
         ("recipe tiny_fsdp_2cpu_bs4: ", "--num_train_epochs 'inf'")),
    Case("run-override-unknown", [*RUN, "--frobnicate", "1"], "unknown flag '--frobnicate'"),
    Case("run-flash-attn", [*RUN, "--attn_implementation", "flash_attention_2"],
         "the flash_attn package is not installed", "flash_attn"),
    Case("recipe-unknown", ["shardkit", "run", "no_such_recipe", "--results", "{out}"],
         "unknown recipe 'no_such_recipe'"),
    Case("recipe-not-utf8", ["shardkit", "run", "recipes/latin1.env", "--results", "{out}"],
         "recipes/latin1.env:2: not UTF-8 text (byte 0xe9)"),
    Case("recipe-name-contradicts", ["shardkit", "run", "recipes/tiny_fsdp_2cpu_bs4.env", "--results", "{out}"],
         "recipes/tiny_fsdp_2cpu_bs4.env:3: GPUS=4 contradicts the file name tiny_fsdp_2cpu_bs4"),
    Case("recipe-epochs-inf", ["shardkit", "run", "recipes/epochs_inf.env", "--results", "{out}"],
         "recipes/epochs_inf.env:6: EPOCHS 'inf'"),
    Case("recipe-unknown-key", ["shardkit", "run", "recipes/unknown_key.env", "--results", "{out}"],
         "recipes/unknown_key.env:6: unknown key LR"),
    Case("reproduce-memory-tol", [*REPRODUCE, "--memory-tol", "-1"],
         "argument --memory-tol: '-1': a tolerance cannot be negative"),
    Case("reproduce-time-tol", [*REPRODUCE, "--time-tol", "nan"], "argument --time-tol: 'nan': must be a finite"),
    Case("reproduce-timeout-0", [*REPRODUCE, "--timeout", "0"], "argument --timeout: '0': a time limit must be"),
    Case("reproduce-probe", [*REPRODUCE, "--probe", "-3"], "argument --probe: '-3'"),
    # shardkit diff: the results files
    Case("diff-truncated", ["shardkit", "diff", "results/trunc", "--report", "{out}"],
         ("results/trunc/results.json:", NOT_JSON)),
    Case("diff-not-json", ["shardkit", "diff", "results/nonjson", "--report", "{out}"],
         f"results/nonjson/results.json:1:1: {NOT_JSON}"),
    Case("diff-empty", ["shardkit", "diff", "results/empty/results.json", "--report", "{out}"],
         "results/empty/results.json: empty file"),
    Case("diff-list", ["shardkit", "diff", "results/list", "--report", "{out}"],
         "results/list/results.json: a JSON list, not a results document"),
    Case("diff-no-run", ["shardkit", "diff", "results/no_run", "--report", "{out}"],
         "results/no_run/results.json: run is missing"),
    Case("diff-no-loss", ["shardkit", "diff", "results/no_loss", "--report", "{out}"],
         "results/no_loss/results.json: loss is missing"),
    Case("diff-status", ["shardkit", "diff", "results/bad_status", "--report", "{out}"],
         "results/bad_status/results.json: status 'finished'"),
    Case("diff-error-without-failure", ["shardkit", "diff", "results/error_no_failure", "--report", "{out}"],
         "results/error_no_failure/results.json: status 'error' without a failure"),
    Case("diff-schema-99", ["shardkit", "diff", "results/v99", "--report", "{out}"],
         "results/v99/results.json: schema_version 99"),
    Case("diff-field-type", ["shardkit", "diff", "results/world_size", "--report", "{out}"],
         "results/world_size/results.json: run.world_size 'eight'"),
    Case("diff-twice", ["shardkit", "diff", "results/twice", "--report", "{out}"],
         "a second result for tiny_fsdp_2cpu_bs4"),
    Case("diff-nothing", ["shardkit", "diff", "results/none", "--report", "{out}"],
         "no results.json in or below results/none"),
    Case("diff-no-such-path", ["shardkit", "diff", "good", "no_such_path", "--report", "{out}"],
         "no_such_path: no such file or folder"),
    Case("diff-tolerance", ["shardkit", "diff", "good", "--loss-tol", "-1", "--report", "{out}"],
         "argument --loss-tol: '-1': a tolerance cannot be negative"),
    Case("diff-report-is-file", ["shardkit", "diff", "good", "--report", "afile"],
         "argument --report: 'afile': is a file, not a folder"),
    Case("diff-unknown-flag", ["shardkit", "diff", "good", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    # shardkit plan, slurm, smoke, and the command itself
    Case("plan-unit", [*PLAN, "--gpu-mem", "80x"], "--gpu-mem '80x': expected a size"),
    Case("plan-infinite", [*PLAN, "--gpu-mem", "1e400"], "--gpu-mem '1e400': must be more than 0 bytes, and finite"),
    Case("plan-global-batch", [*PLAN, "--global-batch", "0"], "argument --global-batch: '0': must be at least 1"),
    Case("plan-recipe-contradicts", ["shardkit", "plan", "recipes/tiny_fsdp_2cpu_bs4.env"],
         "GPUS=4 contradicts the file name"),
    Case("slurm-nodes-0", ["shardkit", "slurm", "llama-7b_fsdp_8gpu_bs4", "--nodes", "0"],
         "argument --nodes: '0': must be at least 1"),
    Case("slurm-nodes-uneven", ["shardkit", "slurm", "llama-7b_fsdp_8gpu_bs4", "--nodes", "3"],
         "--nodes 3: recipe llama-7b_fsdp_8gpu_bs4 has 8 GPUs, which must split evenly"),
    Case("smoke-results-is-file", ["shardkit", "smoke", "--results", "afile"], "argument --results: 'afile'"),
    Case("no-command", ["shardkit"], "the following arguments are required: command"),
    Case("unknown-command", ["shardkit", "frobnicate"], "invalid choice: 'frobnicate'"),
]
