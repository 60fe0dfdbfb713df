"""What must hold on whichever stack is installed: today's (the test environment) and the table's own, the
period stack (Python 3.10, torch 2.0.1, transformers 4.28.1, DeepSpeed 0.9.2, pydantic 1.10), where
`nox -s period` runs this module and the seed dry runs of test_cli.py. On the period stack nothing trains on
CPU (its HF Trainer needs CUDA for FSDP, its DeepSpeed has no CPU accelerator), so what is checked there is
what runs before the ranks and around them: the worker path's imports, the command lines, the refusals, the
measuring callback in HF Trainer's loop, the results document, and real ranks up to HF Trainer's FSDP."""

import importlib
import shlex
import subprocess
import sys

import pytest
import torch
from packaging.version import Version

from conftest import RECIPES, ROOT, cpu_env, run_train
from shardkit.engine import preflight
from shardkit.errors import UsageError

PERIOD = Version(torch.__version__).release < (2, 1)
STACK = "period" if PERIOD else "today"
ENGINE = "hf" if PERIOD else "native"

# Everything a rank of the hf engine imports, and the measurement and results code around it.
WORKER_PATH = ["shardkit.train", "shardkit.engine.launch", "shardkit.engine.rank", "shardkit.engine.hf_trainer",
               "shardkit.engine.measure", "shardkit.engine.environment", "shardkit.engine.data",
               "shardkit.engine.models", "shardkit.results.document", "shardkit.verdict.diff"]


@pytest.mark.parametrize("module", WORKER_PATH)
def test_the_worker_path_imports(module):
    importlib.import_module(module)


def test_the_seed_command_lines_through_shardkits_launcher(tmp_path):
    """The seed's two command lines run by `python finetune_llama.py` (shardkit starts the ranks) instead of
    torchrun (test_cli.py): the engine the installed stack defaults to, and the stack a run would record."""
    from test_cli import seed_blocks

    for name, method in (("FSDP", "fsdp_offload"), ("Deepspeed", "zero3_offload")):
        command = shlex.split(seed_blocks()[name].replace("\\\n", " "))
        argv = command[command.index("finetune_llama.py") + 1:]
        result = subprocess.run([sys.executable, "finetune_llama.py", *argv, "--nproc_per_node", "8",
                                 "--output_dir", str(tmp_path / "test"), "--dry_run", "True"], cwd=RECIPES, env=cpu_env(), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"method       {method} (engine {ENGINE}, {STACK} stack)" in result.stdout
        assert "world size   8" in result.stdout
        assert not any(tmp_path.iterdir())


def test_hf_fsdp_on_cpu_is_one_line_with_what_this_stack_can_do_instead(tmp_path):
    result = run_train(["--model_name_or_path", "tiny", "--engine", "hf", "--fsdp", "full_shard auto_wrap",
                        "--nproc_per_node", "2", "--max_steps", "2", "--output_dir", str(tmp_path / "out")])
    assert result.returncode == 2
    assert result.stderr.startswith("shardkit: error: --engine hf with --fsdp needs GPUs: HF Trainer does not shard")
    assert result.stderr.count("\n") == 1
    # Only what runs here is offered: the native engine needs FSDP2, which the period torch lacks.
    assert ("--engine native" in result.stderr) is not PERIOD
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.skipif(not PERIOD, reason="today's DeepSpeed trains on CPU (the tiny recipes do)")
def test_period_deepspeed_on_cpu_is_one_line(tmp_path):
    result = run_train(["--model_name_or_path", "tiny", "--deepspeed", str(RECIPES / "configs" / "zero3_no_offload.json"),
                        "--nproc_per_node", "2", "--max_steps", "2", "--output_dir", str(tmp_path / "out")])
    assert result.returncode == 2
    assert result.stderr == "shardkit: error: --deepspeed needs GPUs with DeepSpeed 0.9.2: it has no CPU accelerator; use a GPU\n"


@pytest.mark.skipif(not PERIOD, reason="today's torch has FSDP2")
def test_the_native_engine_on_the_period_stack_is_one_line(tmp_path):
    result = run_train(["--model_name_or_path", "tiny", "--engine", "native", "--fsdp", "full_shard auto_wrap",
                        "--nproc_per_node", "2", "--max_steps", "2", "--output_dir", str(tmp_path / "out")])
    assert result.returncode == 2
    assert result.stderr.startswith("shardkit: error: --engine native needs torch >= 2.6 (FSDP2")
    assert "this is torch 2.0.1" in result.stderr and result.stderr.count("\n") == 1


# torch 2.0.1+cu117's torch.cuda.get_arch_list(), read from the period image's wheel; today's CUDA 13 build
# as its own list says (it ends in PTX).
PERIOD_ARCHS = ["sm_37", "sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86"]
CUDA13_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


@pytest.mark.parametrize("capability, period, today", [
    ((8, 0), True, True),    # A100
    ((8, 6), True, True),    # A10, RTX 30xx
    ((8, 9), True, True),    # L40, RTX 40xx: sm_86's cubin runs on a newer minor version
    ((9, 0), False, True),   # H100, H200
    ((10, 0), False, True),
    ((12, 1), False, True),  # newer than every cubin: PTX compiled by the driver
    ((7, 0), True, False),   # V100: gone from today's build
])
def test_which_gpus_a_torch_build_has_kernels_for(capability, period, today):
    assert preflight.has_kernels_for(capability, PERIOD_ARCHS) is period
    assert preflight.has_kernels_for(capability, CUDA13_ARCHS) is today


def test_a_gpu_the_build_cannot_run_on_is_one_line_before_the_ranks(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "11.7")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: PERIOD_ARCHS)
    monkeypatch.setattr(preflight, "_visible_gpus", lambda: [("NVIDIA H200", (9, 0))])
    with pytest.raises(UsageError) as refused:
        preflight.check_gpu_kernels()
    assert str(refused.value).startswith("NVIDIA H200 (sm_90) cannot run this torch")
    assert "sm_37 sm_50 sm_60 sm_70 sm_75 sm_80 sm_86" in str(refused.value)
    monkeypatch.setattr(preflight, "_visible_gpus", lambda: [("NVIDIA A100-SXM4-80GB", (8, 0))])
    preflight.check_gpu_kernels()


def test_shardkits_measurement_inside_this_stacks_hf_trainer_makes_a_document_that_reads_back(tmp_path):
    """The hf engine's pieces on the installed stack, in one CPU process (no sharding: nothing shards on the
    period stack's CPU): the model builder, the data set, the measuring callback inside HF Trainer's own loop,
    then the results document from what it recorded and the environment capture. The readers accept it and it
    names the stack that made it."""
    import math

    from transformers import Trainer, TrainingArguments

    from shardkit.engine.data import build_dataset
    from shardkit.engine.environment import capture
    from shardkit.engine.hf_trainer import _measuring_callback, training_arguments
    from shardkit.engine.measure import MemoryMonitor
    from shardkit.engine.models import build_model
    from shardkit.results import document
    from shardkit.results.files import write_json_atomic
    from shardkit.results.record import Recorder
    from shardkit.spec.flags import parse_args
    from shardkit.spec.resolve import resolve
    from shardkit.verdict.diff import run_stack

    cfg, launch = parse_args(["--model_name_or_path", "tiny", "--fsdp", "full_shard auto_wrap", "--engine", "hf",
                              "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_steps", "3",
                              "--save_strategy", "no", "--output_dir", str(tmp_path)])
    run = resolve(cfg, launch)
    recorder, memory = Recorder(), MemoryMonitor(cfg.nvml_sample_interval_s)
    unsharded = {k: v for k, v in training_arguments(run, torch.device("cpu")).items() if not k.startswith("fsdp")}
    trainer = Trainer(model=build_model(run.plan.model, cfg.attn_implementation, cfg.seed),
                      args=TrainingArguments(**unsharded), train_dataset=build_dataset(cfg, run.plan.model, run.plan.seq_len),
                      callbacks=[_measuring_callback(recorder, memory, run.plan, 0, 1)])
    trainer.train()
    assert len(recorder.loss) == len(recorder.step_times_s) == 3 and all(map(math.isfinite, recorder.loss))
    written = document.document(status="ok", run=run, recorder=recorder, per_rank=[{"rank": 0, "memory": memory.close()}],
                                environment=capture(1), data_info=None, failure=None, launch_time=0.0, now=3.0)
    write_json_atomic(tmp_path / document.RESULTS_FILE, written)
    read = document.read_results(tmp_path / document.RESULTS_FILE)
    assert read["run"]["stack"] == run_stack(read) == STACK
    assert Version(read["environment"]["versions"]["torch"]).release == Version(torch.__version__).release
    assert read["loss"] == recorder.loss and read["memory"]["max_over_ranks"]["host_rss_peak_bytes"] > 0


def test_the_period_lock_pins_the_tables_stack_with_hashes():
    lock = (ROOT / "requirements" / "period.lock").read_text()
    for pin in ("torch==2.0.1", "transformers==4.28.1", "accelerate==0.18.0", "numpy==1.24.3", "pydantic==1.10."):
        assert f"\n{pin}" in f"\n{lock}"
    deepspeed = (ROOT / "requirements" / "period-deepspeed.lock").read_text()
    assert deepspeed.startswith("deepspeed==0.9.2 \\\n    --hash=sha256:")
    for text in (lock, deepspeed):
        blocks = [block for block in text.split("\n") if "==" in block and not block.startswith(" ")]
        assert blocks and all(block.endswith("\\") for block in blocks)  # each pin continues with its hashes


def test_compose_builds_the_period_image_as_shardkit_image_build_does():
    import yaml

    from shardkit.orchestration.containers import PERIOD_BUILD_ARGS

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["period"]["build"]["args"] == {"FLAVOUR": "period", **PERIOD_BUILD_ARGS}
    assert services["period"]["deploy"] == services["recipe"]["deploy"]  # GPUs, as for today's image


def test_the_seeds_fsdp_flags_are_the_installed_transformers_training_arguments(tmp_path):
    """hf_trainer names each flag as the installed transformers spells it (4.28: evaluation_strategy,
    warmup_ratio, no_cuda, fsdp_transformer_layer_cls_to_wrap; 5: eval_strategy, warmup_steps, use_cpu,
    fsdp_config). DeepSpeed's arguments start its process group at construction, so only FSDP's are built here."""
    from transformers import TrainingArguments

    from shardkit.engine.hf_trainer import training_arguments
    from shardkit.spec.flags import parse_args
    from shardkit.spec.resolve import resolve

    cfg, launch = parse_args(["--model_name_or_path", "tiny", "--bf16", "True", "--gradient_checkpointing", "True",
                              "--evaluation_strategy", "no", "--warmup_ratio", "0.03", "--fsdp", "full_shard auto_wrap offload",
                              "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--output_dir", str(tmp_path),
                              "--nproc_per_node", "2"])
    built = TrainingArguments(**training_arguments(resolve(cfg, launch), torch.device("cpu")))
    if isinstance(built.fsdp, list):  # 4.28: the options themselves
        assert [option.value for option in built.fsdp] == ["full_shard", "auto_wrap", "offload"]
        assert built.fsdp_transformer_layer_cls_to_wrap == "LlamaDecoderLayer"
    else:  # 5: fsdp=True, the options in fsdp_config
        config = built.fsdp_config
        assert built.fsdp is True and config["reshard_after_forward"] and config["cpu_offload"]
        assert config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert built.gradient_checkpointing and built.bf16 and built.lr_scheduler_type.value == "linear"
    assert 0.03 in (getattr(built, "warmup_ratio", None), built.warmup_steps)  # 5: a float below 1 is a ratio
    assert built.per_device_train_batch_size == 8 and built.gradient_accumulation_steps == 1


@pytest.mark.skipif(not PERIOD, reason="today's transformers has sdpa")
def test_an_attention_kernel_the_period_transformers_lacks_is_one_line():
    result = run_train(["--model_name_or_path", "tiny", "--attn_implementation", "sdpa", "--fsdp", "full_shard",
                        "--dry_run", "True"])
    assert result.returncode == 2
    assert result.stderr == ("shardkit: error: --attn_implementation sdpa: transformers 4.28.1 has only eager "
                             "attention (the table's); use eager\n")


@pytest.mark.skipif(not PERIOD, reason="today's HF Trainer trains this on CPU, as DDP (what the refusal is for)")
def test_the_period_ranks_write_their_failure_as_a_result(tmp_path):
    """The whole worker path on the period stack, launcher to results file: the refusal is skipped on purpose,
    so that torch 2.0.1's elastic agent starts two ranks over gloo and HF Trainer 4.28 gets as far as its
    FSDP, which wants CUDA; the failing rank writes the run's result with what it captured."""
    from shardkit.results.document import read_results

    script = ("import sys; from shardkit.spec.flags import parse_args; from shardkit.spec.resolve import resolve; "
              "from shardkit.engine.launch import launch; sys.exit(launch(resolve(*parse_args(sys.argv[1:]))))")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", script, "--model_name_or_path", "tiny", "--fsdp", "full_shard auto_wrap",
                             "--nproc_per_node", "2", "--max_steps", "2", "--save_strategy", "no", "--output_dir",
                             str(out)], cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    document = read_results(out / "results.json")
    assert document["status"] == "error" and document["run"]["stack"] == "period"
    assert document["run"]["engine"] == "hf" and "NVIDIA driver" in document["failure"]["message"]
    assert document["environment"]["versions"]["transformers"] == "4.28.1"
