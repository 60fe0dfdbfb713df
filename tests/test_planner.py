"""The memory planner: each term's formula, each method, the verdicts on the table's 27 rows, agreement with
DeepSpeed's estimator, exact agreement with what CPU ranks hold, the CLI and its bad input."""

import dataclasses
import json
import math
import os
import re

import pytest

from conftest import ROOT, results_of, run_train, tiny
from shardkit import cli, planner
from shardkit.planner import memory_model as mm
from shardkit.spec import recipes, reference
from shardkit.spec.parallelism import Parallelism

GIB = 2**30
LLAMA_7B = planner.shape_of("llama-7b")


def by_name(p: planner.Prediction) -> dict[str, mm.Term]:
    return {t.name: t for t in p.terms}


def seven_b(method="fsdp", offload=False, gpus=8, batch=1, ckpt=True, accumulation=8, attention="eager",
            stack="today") -> planner.Prediction:
    return planner.predict(planner.workload("llama-7b", Parallelism(method, offload), gpus, batch, ckpt, accumulation, attention),
                           stack)


def test_llama_shapes_give_the_published_parameter_counts():
    assert LLAMA_7B.params == 6_738_415_616
    assert planner.shape_of("decapoda-research/llama-65b-hf").params == 65_285_660_672
    assert sum(math.prod(d) for unit in LLAMA_7B.units() for d in unit) == LLAMA_7B.params


@pytest.mark.parametrize("stack", ["today", "2023"])
def test_fsdp_model_states_are_16_bytes_per_parameter_over_n(stack):
    terms = by_name(seven_b(stack=stack))
    per_rank = LLAMA_7B.params // 8  # every LLaMA-7B dimension divides by 8: no padding
    assert terms["fp32 parameter shard"].bytes == 4 * per_rank
    assert terms["fp32 gradient shard"].bytes == 4 * per_rank
    assert terms["Adam exp_avg + exp_avg_sq, fp32"].bytes == 8 * per_rank
    assert {t.device for t in seven_b(offload=True, stack=stack).terms if t.group == "optimizer states"} == {"host"}


def test_zero3_model_states_and_buckets():
    p = seven_b("zero3", accumulation=2)
    terms = by_name(p)
    per_rank = LLAMA_7B.params // 8
    assert terms["bf16 parameter partition"].bytes == 2 * per_rank
    assert terms["bf16 gradient partition"].bytes == 2 * per_rank
    assert terms["fp32 master partition"].bytes + terms["Adam exp_avg + exp_avg_sq, fp32"].bytes == 12 * per_rank
    assert terms["largest module gathered, with its gradient"].bytes == 4 * 32000 * 4096
    assert terms["gradient reduce bucket"].bytes == 4 * 4096**2  # reduce_bucket_size "auto" = hidden^2
    offloaded = seven_b("zero3", offload=True, accumulation=2)
    assert all(t.device == "host" for t in offloaded.terms if t.group in ("parameters", "gradients", "optimizer states"))
    assert offloaded.host == 18 * LLAMA_7B.params  # per node: 2 + 4 + 12 bytes per parameter


def test_activations_follow_the_per_layer_formula():
    s, t = LLAMA_7B, 2048
    p = by_name(seven_b(stack="2023"))
    assert p["checkpointed layer inputs"].bytes == 2 * t * s.hidden * s.layers
    layer = 26 * t * s.hidden + 8 * t + 8 * t * s.intermediate + 8 * 32 * 2048**2
    assert p["one layer recomputed in backward"].bytes == layer
    assert p["backward transient"].bytes == 6 * 32 * 2048**2
    assert p["vocabulary-sized tensors of the loss"].bytes == 8 * t * 32000
    assert by_name(seven_b(stack="today"))["vocabulary-sized tensors of the loss"].bytes == 12 * t * 32000
    no_ckpt = by_name(seven_b(ckpt=False, stack="2023"))
    # without checkpointing 4.28's first RMSNorm also keeps the layer's input
    assert no_ckpt["all 32 layers' saved tensors"].bytes == 32 * (layer + 2 * t * s.hidden)
    # batch scales every activation term linearly
    four = by_name(seven_b(batch=4, stack="2023"))
    assert four["checkpointed layer inputs"].bytes == 4 * p["checkpointed layer inputs"].bytes


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_one_layers_saved_tensors_are_what_transformers_saves(attention):
    """Counts, with autograd's saved-tensor hooks, every tensor a real bf16 LlamaDecoderLayer of transformers
    (the installed version: today's stack) keeps for backward, and compares with the planner's term."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    h, inter, heads, seq, batch = 192, 512, 4, 96, 3
    config = LlamaConfig(hidden_size=h, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=heads,
                         num_hidden_layers=1, vocab_size=1000, max_position_embeddings=seq)
    config._attn_implementation = attention
    layer = LlamaDecoderLayer(config, 0).to(torch.bfloat16)
    x = torch.randn(batch, seq, h, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(seq)[None].expand(batch, seq)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions)
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None].to(torch.bfloat16).expand(batch, 1, seq, seq)
    # Parameters, the layer's input (the checkpoint), and what all layers share are not the layer's own.
    shared = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), x, cos, sin, mask)}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in shared:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x, attention_mask=mask if attention == "eager" else None, position_ids=positions,
              position_embeddings=(cos, sin))
    w = mm.Workload(mm.Architecture(h, inter, 1, heads, 1000), Parallelism("fsdp", False), 1, batch, seq, True, 1, attention)
    assert sum(saved.values()) == by_name(planner.predict(w))["one layer recomputed in backward"].bytes


def test_memory_efficient_attention_has_no_quadratic_term():
    def layer(seq):
        w = planner.workload("llama-7b", Parallelism("fsdp", False), 8, 1, True, 8, "sdpa", seq_len=seq,
                             beyond_context=True)
        return by_name(planner.predict(w))["one layer recomputed in backward"].bytes
    assert layer(4096) == 2 * layer(2048)
    eager = by_name(seven_b())["one layer recomputed in backward"].bytes
    assert eager - layer(2048) > 6 * 32 * 2048**2 * 0.99


def test_host_memory_offload_pinned_and_the_2023_load():
    P = LLAMA_7B.params
    offload = seven_b(offload=True, gpus=2, stack="2023")
    assert offload.host == 16 * P and offload.host_pinned == 8 * P  # Adam's moments are not pinned
    assert seven_b(stack="2023").host == 4 * P * 8  # every rank loads the fp32 model before FSDP wraps it
    assert seven_b(stack="today").host == 0
    zero3 = seven_b("zero3", offload=True, accumulation=2)
    assert zero3.host_pinned == 10 * P  # bf16 parameters, fp32 master and fp32 gradients
    small = planner.predict(zero3.workload, "today", host_memory=100 * GIB)
    assert small.host_verdict == "oom" and "host OOM" in small.summary()


def test_activation_variants_price_each_choice():
    p = seven_b(stack="2023")
    variants = p.activation_variants()
    assert variants["no checkpointing, eager"] > variants["no checkpointing, sdpa"] > variants["checkpointing, eager"]
    assert variants["checkpointing, eager"] > variants["checkpointing, sdpa"]
    own = mm.peak([t for t in p.terms if t.group in ("activations", "logits and loss")])
    assert variants["checkpointing, eager"] == own


def test_the_2023_stack_adds_no_sync_gradients_and_all_gathers_issued_ahead():
    old, new = by_name(seven_b(stack="2023")), by_name(seven_b(stack="today"))
    no_sync = "unsharded bf16 gradients accumulated under no_sync()"
    assert old[no_sync].bytes == 2 * LLAMA_7B.params and no_sync not in new
    assert no_sync not in by_name(seven_b(stack="2023", accumulation=1))
    ahead = old["all-gathers issued ahead (limit_all_gathers=False)"]
    assert ahead.kind == "elastic" and ahead.bytes == 30 * 2 * LLAMA_7B.layer_params
    assert old["root unit unsharded (embeddings, LM head, norm)"].bytes == 2 * (2 * 32000 * 4096 + 4096)


def test_phases_do_not_add_up():
    p = seven_b(stack="2023")
    always = sum(t.bytes for t in p.terms if t.device == "gpu" and t.kind == "live" and t.phase is None)
    layer = sum(t.bytes for t in p.terms if t.device == "gpu" and t.kind == "live" and t.phase == "layer")
    loss = sum(t.bytes for t in p.terms if t.device == "gpu" and t.kind == "live" and t.phase == "loss")
    assert p.live == always + max(layer, loss) < always + layer + loss


def test_verdicts_fits_at_capacity_and_oom():
    w = planner.workload("llama-7b", Parallelism("fsdp", False), 8, 1, True, 8)
    p = planner.predict(w, "2023")
    assert p.verdict == "fits" and p.reported == p.with_elastic
    squeezed = planner.predict(w, "2023", gpu_memory=(p.live + p.with_elastic) // 2)
    assert squeezed.verdict == "at capacity" and squeezed.reported == squeezed.gpu_memory
    small = planner.predict(w, "2023", gpu_memory=p.live - 1)
    assert small.verdict == "oom" and small.margin == -1 and small.reported is None


TABLE = reference.load_table()
# The two ZeRO-3 rows the planner gets wrong: what ZeRO-3 must hold at once fits the card in both (row 11 is "at
# capacity": nvidia-smi reaches the card, but the gathered layers that fill it are freed before an OOM), while
# the table says OOM (docs/planner.md, "Where it misses").
WRONG_VERDICTS = {"llama-13b_zero3-offload_4gpu_bs1_nockpt", "llama-13b_zero3-offload_4gpu_bs16"}
CALIBRATION = {row["recipe"]: row for row in planner.calibration()}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="ZeRO-3: OOM in the table")) if n in WRONG_VERDICTS else n
    for n in TABLE])
def test_verdict_on_every_table_row(name):
    row = CALIBRATION[name]
    assert (row["verdict"] == "oom") == (TABLE[name].status == "oom"), row


# The ZeRO-3 rows that ran and that the planner misses by more than 20%, each explained in docs/planner.md:
# below where the table shows more gathered layers held than the CPU's lead gives, above where the lead
# exceeds the 25-38 layers the table shows.
OUTSIDE_20_PERCENT = {f"llama-{n}_zero3-offload_{g}gpu_bs{b}" for n, g, b in [
    ("13b", 4, 1), ("30b", 4, 1), ("30b", 4, 6), ("30b", 8, 1), ("30b", 8, 4), ("30b", 8, 8), ("65b", 8, 1),
    ("65b", 8, 2)]}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="ZeRO-3 missed by more than 20%"))
    if n in OUTSIDE_20_PERCENT else n
    for n, r in TABLE.items() if r.status == "ok"])
def test_rows_that_ran_within_20_percent(name):
    row = CALIBRATION[name]
    assert row["within_20pct"], row


def test_every_fsdp_row_within_20_percent_and_right_verdict():
    fsdp = [r for r in CALIBRATION.values() if "fsdp" in r["recipe"]]
    assert len(fsdp) == 12
    assert all(r["verdict_agrees"] for r in fsdp)
    assert all(r["within_20pct"] for r in fsdp if r["table_gb"] is not None)


def test_docs_show_the_current_calibration():
    doc = (ROOT / "docs" / "planner.md").read_text()
    rows = planner.calibration()
    assert planner.calibration_markdown(rows) in doc, "regenerate: shardkit plan --calibration"
    assert planner.zero3_lead_markdown(rows) in doc, "regenerate: shardkit plan --calibration"


def test_zero3_terms_agree_with_deepspeeds_estimator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    for model, gpus in (("llama-7b", 8), ("llama-13b", 4), ("llama-65b", 8)):
        shape = planner.shape_of(model)
        cpu, gpu, largest = stage3.estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_module_params, num_gpus_per_node=gpus, cpu_offload=True,
            cpu_offload_params=True, zero_init=True, additional_buffer_factor=1)
        offloaded = planner.predict(planner.workload(model, Parallelism("zero3", True), gpus, 1, True))
        assert by_name(offloaded)["largest module gathered, with its gradient"].bytes == gpu == largest
        assert offloaded.host == cpu
        _, gpu_resident, _ = stage3.estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_module_params, num_gpus_per_node=gpus, cpu_offload=False,
            cpu_offload_params=False, zero_init=True, additional_buffer_factor=1)
        # DeepSpeed's 18 bytes: bf16 parameter, fp32 master, Adam moments and the step's fp32 gradient of the
        # whole partition (the planner upcasts one sub_group_size slice at a time: set it above the partition to
        # model the same thing). It leaves out the bf16 gradient partition, which the planner adds on its own.
        whole = dataclasses.replace(planner.workload(model, Parallelism("zero3", False), gpus, 1, True), sub_group_size=10**12)
        resident = by_name(planner.predict(whole))
        states = sum(resident[k].bytes for k in ("bf16 parameter partition", "fp32 master partition",
                                                  "Adam exp_avg + exp_avg_sq, fp32",
                                                  "fp32 gradient of one sub-group during the step"))
        assert states + resident["largest module gathered, with its gradient"].bytes == pytest.approx(gpu_resident, abs=8)


def _planner_holdings(method: str, offload: bool, gpus: int, stack="today") -> dict:
    w = planner.workload("tiny", Parallelism(method, offload), gpus, 4, False)
    terms = by_name(planner.predict(w, stack))
    return {"elements": mm.local_elements(w, stack), "terms": terms}


@pytest.mark.slow
@pytest.mark.parametrize("method,args,gpus", [
    ("fsdp", ["--fake_world", "3"], 3),  # 3 does not divide the tiny model's rows: torch.chunk's uneven split
    ("fsdp", [], 2),
    ("zero3_offload", [], 2),
])
def test_what_cpu_ranks_hold_matches_the_planner_exactly(tmp_path, method, args, gpus):
    command = tiny(tmp_path, method, *args, ranks=1 if args else 2)
    result = run_train(command)
    assert result.returncode == 0, result.stderr[-3000:]
    sharding = json.loads((tmp_path / "sharding.json").read_text())["per_rank"]
    expected = _planner_holdings("zero3" if "zero3" in method else "fsdp", method.endswith("offload"), gpus)
    terms = expected["terms"]
    adam = terms["Adam exp_avg + exp_avg_sq, fp32"].bytes
    rank0 = sharding[0]
    assert sum(p["local"] for p in rank0["parameters"].values()) == expected["elements"]
    assert rank0["optimizer_state_bytes"] == adam
    if method == "fsdp":
        assert rank0["gradient_bytes"] == terms["fp32 gradient shard"].bytes
        assert 4 * expected["elements"] == terms["fp32 parameter shard"].bytes
    else:
        assert rank0["gradient_bytes"] == terms["fp32 gradient partition"].bytes
        assert rank0["master_bytes"] == terms["fp32 master partition"].bytes
    if args:
        assert results_of(tmp_path)["run"]["fake_world"] == 3 and len(sharding) == 1


@pytest.mark.slow
@pytest.mark.parametrize("args,gpus", [
    ([], 2),
    (["--fake_world", "7"], 7),  # 7 divides no unit: FSDP1 pads every FlatParameter to a multiple of N
])
def test_the_2023_stack_holds_what_the_planners_2023_terms_say(tmp_path, args, gpus):
    """FSDP1 as HF Trainer 4.28 ran it (--stack 2023), bf16, two micro-batches per step: the flat padded
    parameter slices, the fp32 gradient shard, Adam's states, the unsharded bf16 gradients held under
    no_sync() and the fp32 model every rank loads before wrapping, each equal to the planner's term."""
    command = tiny(tmp_path, "fsdp", "--stack", "2023", "--bf16", "True", "--gradient_accumulation_steps", "2",
                   *args, ranks=1 if args else 2)
    result = run_train(command)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = json.loads((tmp_path / "sharding.json").read_text())["per_rank"][0]
    w = planner.workload("tiny", Parallelism("fsdp", False), gpus, 4, False, accumulation=2)
    terms = by_name(planner.predict(w, "2023"))
    local = mm.local_elements(w, "2023")
    assert local != mm.local_elements(w, "today") or not args  # the two layouts differ where N divides no unit
    assert sum(p["local"] for p in rank0["parameters"].values()) == local
    assert len(rank0["parameters"]) == w.shape.layers + 1  # one FlatParameter per decoder layer, and the root
    assert rank0["gradient_bytes"] == terms["fp32 gradient shard"].bytes
    assert rank0["optimizer_state_bytes"] == terms["Adam exp_avg + exp_avg_sq, fp32"].bytes
    assert rank0["unsharded_gradient_bytes"] == terms["unsharded bf16 gradients accumulated under no_sync()"].bytes
    assert rank0["load_copy_bytes"] == terms["full fp32 model loaded by every rank before wrapping"].bytes
    assert results_of(tmp_path)["run"]["stack"] == "2023-emulated"


def test_search_lists_what_fits_for_30b_on_four_gpus():
    found = planner.search("llama-30b", 4, 80 * GIB)
    fitting = {(p.workload.method, p.workload.offload) for p in found if p.verdict != "oom"}
    assert ("zero3", True) in fitting and ("fsdp", False) not in fitting  # the table: FSDP OOM, ZeRO-3 ran
    text = planner.render_search(found, "llama-30b", 4, 80 * GIB, "today")
    assert "zero3 + offload" in text and "configurations fit" in text


def test_search_with_global_batch_splits_into_micro_batch_and_accumulation():
    found = planner.search("llama-7b", 4, global_batch=32)
    assert {p.workload.micro_batch * p.workload.accumulation * 4 for p in found} == {32}


def test_cli_prints_a_breakdown_and_json(capsys):
    assert cli.main(["plan", "llama-30b_zero3-offload_4gpu_bs8", "--stack", "2023", "--host-mem", "1TB"]) == 0
    out = capsys.readouterr().out
    for group in ("parameters", "gradients", "optimizer states", "activations", "logits and loss",
                  "communication and prefetch", "runtime"):
        assert group in out
    assert "fits" in out and "2023 stack" in out
    assert cli.main(["plan", "llama-7b_fsdp_8gpu_bs1", "llama-30b_fsdp_4gpu_bs1", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    documents = [json.loads(line) for line in lines]
    assert [d["verdict"] for d in documents] == ["fits", "oom"]
    assert documents[1]["margin_bytes"] < 0 and documents[0]["stack"] == "today"


def test_cli_model_search(capsys):
    assert cli.main(["plan", "--model", "llama-30b", "--gpus", "4", "--gpu-mem", "80GB"]) == 0
    assert re.search(r"zero3 \+ offload\s+yes\s+1 ", capsys.readouterr().out)


@pytest.mark.parametrize("argv,message", [
    (["plan", "llama-7b_fsdp_8gpu_bs1", "--gpu-mem", "0"], "--gpu-mem '0': must be more than 0 bytes"),
    (["plan", "llama-7b_fsdp_8gpu_bs1", "--gpu-mem", "lots"], "--gpu-mem 'lots': expected a size"),
    (["plan", "--model", "llama-31b", "--gpus", "4"], "--model 'llama-31b': not a catalogued model"),
    (["plan", "--model", "llama-7b", "--gpus", "4", "--global-batch", "10"], "--global-batch 10: does not divide"),
    (["plan", "--model", "llama-7b", "--gpus", "0"], "--gpus 0: needs at least one GPU"),
    (["plan", "--model", "llama-7b", "--gpus", "0", "--global-batch", "8"], "--gpus 0: needs at least one GPU"),
    (["plan", "llama-7b_fsdp_8gpu_bs1", "--gpus", "0"], "--gpus 0: needs at least one GPU"),
    (["plan", "--model", "llama-7b"], "--model needs --gpus"),
    (["plan", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["plan"], "name recipes to plan"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_reproduce_skips_rows_predicted_oom_on_small_gpus():
    from shardkit.orchestration import campaign

    recipe = recipes.load_recipe("llama-30b_fsdp_4gpu_bs1")
    assert "predicted OOM" in campaign.predicted_oom(recipe, 80 * GIB)
    assert campaign.predicted_oom(recipes.load_recipe("llama-7b_fsdp_8gpu_bs1"), 80 * GIB) is None
    assert campaign.predicted_oom(recipe, None) is None  # no GPU: nothing to predict against


def test_fake_world_is_refused_where_it_cannot_work(tmp_path):
    result = run_train(tiny(tmp_path, "zero3_offload", "--fake_world", "4", ranks=1))
    assert result.returncode == 2 and "--fake_world 4: only for FSDP" in result.stderr
    assert os.listdir(tmp_path) == []



def test_the_2023_stack_builds_fp32_whatever_the_folders_config_says():
    """Published LLaMA folders say torch_dtype float16, and transformers 5 builds in it; the 2023 stack loaded
    fp32 on every rank, and so does --stack 2023 (the planner's 4 bytes x P load copy)."""
    import torch

    from shardkit.engine.models import build_model
    from shardkit.spec.config import TrainConfig
    from shardkit.spec.presets import ModelSpec, resolve_model

    tiny = resolve_model(TrainConfig(model_name_or_path="tiny")).hf_config
    spec = ModelSpec(name="tiny", hf_config={**tiny, "torch_dtype": "float16"}, weights_dir=None)
    assert next(build_model(spec, "eager", 0).parameters()).dtype == torch.float16  # what the folder asks for
    assert next(build_model(spec, "eager", 0, dtype=torch.float32).parameters()).dtype == torch.float32


def test_zero3_gathered_layers_awaiting_the_compute_stream_are_reserved_not_allocated():
    # 13B on 4 GPUs at batch 8 (the table's row 10): a layer's fetch (11.5 ms) is shorter than its forward
    # (70.8 ms), so the CPU ends the forward 40 (1 - 11.5 / 70.8) layers ahead of the GPU.
    p = planner.predict_recipe(recipes.load_recipe("llama-13b_zero3-offload_4gpu_bs8"), "2023")
    (term,) = [t for t in p.terms if t.name.startswith("gathered layers awaiting")]
    layer = 2 * planner.shape_of("llama-13b").layer_params
    assert term.kind == "reserve" and term.bytes == pytest.approx(33.5 * layer, rel=0.01)
    assert p.reserved == pytest.approx(p.allocated + term.bytes, abs=1)
    assert p.live == mm.peak([t for t in p.terms if t is not term])  # it never decides OOM
    # At batch 1 the fetch takes longer than the forward: no lead, no term.
    small = planner.predict_recipe(recipes.load_recipe("llama-13b_zero3-offload_4gpu_bs1"), "2023")
    assert not [t for t in small.terms if t.name.startswith("gathered layers awaiting")]
    # The lead is a race between the host link and the GPU: a host link twice as fast lets the CPU lead at
    # batch 1 too.
    fast = dataclasses.replace(planner.REFERENCE, card=dataclasses.replace(planner.REFERENCE.card,
                               pcie_bytes_per_s=2 * planner.REFERENCE.card.pcie_bytes_per_s))
    quick = planner.predict_recipe(recipes.load_recipe("llama-13b_zero3-offload_4gpu_bs1"), "2023", hardware=fast)
    assert quick.reserved > small.reserved and quick.live == small.live
