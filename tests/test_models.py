"""The model description (spec/architecture.py) against the models transformers builds, for every catalogued
published configuration, and the catalogue itself."""

import json
from pathlib import Path

import pytest

from shardkit.engine.models import build_model, decoder_layer_class, measured_parameter_counts
from shardkit.spec.architecture import FAMILIES, architecture_of, decoder_layer_of
from shardkit.spec.presets import ModelSpec, catalogue, catalogued, resolve_name

CATALOGUE = sorted(catalogue())


def built(hub_id: str):
    return build_model(ModelSpec(hub_id, catalogue()[hub_id]["config"], None), "eager", 0, meta=True)


@pytest.mark.parametrize("hub_id", CATALOGUE)
def test_parameter_counts_equal_those_of_the_model_transformers_builds(hub_id):
    model = built(hub_id)
    arch = architecture_of(catalogue()[hub_id]["config"], hub_id)
    assert arch.parameter_counts() == measured_parameter_counts(model)
    # The FSDP units' shapes, not just their sums: FSDP2 shards each parameter on its first dimension.
    layer = next(m for m in model.modules() if isinstance(m, decoder_layer_class(model)))
    assert sorted(tuple(p.shape) for p in layer.parameters()) == sorted(arch.layer_shapes())
    assert decoder_layer_class(model).__name__ == decoder_layer_of(catalogue()[hub_id]["config"])


def test_the_catalogue_has_a_dozen_models_of_five_families_each_with_its_source():
    families = {entry["config"]["model_type"] for entry in catalogue().values()}
    assert len(catalogue()) >= 12 and len(families) >= 5 and families <= set(FAMILIES)
    for hub_id, entry in catalogue().items():
        assert entry["source"] == f"https://huggingface.co/{hub_id}/blob/main/config.json"


def test_published_sizes_come_out_of_the_description():
    # Totals the model cards state (rounded there): Llama 3.1 8B, Qwen2.5 7.61B, Gemma 2 9B, Mixtral 46.7B.
    totals = {h: architecture_of(catalogue()[h]["config"], h).params for h in catalogue()}
    assert round(totals["meta-llama/Llama-3.1-8B"] / 1e9, 2) == 8.03
    assert round(totals["Qwen/Qwen2.5-7B"] / 1e9, 2) == 7.62
    assert round(totals["google/gemma-2-9b"] / 1e9, 2) == 9.24
    assert round(totals["mistralai/Mixtral-8x7B-v0.1"] / 1e9, 1) == 46.7
    mixtral = architecture_of(catalogue()["mistralai/Mixtral-8x7B-v0.1"]["config"], "mixtral")
    # "12.9B active parameters": the matmul weights a token meets, and the input embedding it looks up.
    assert round((mixtral.active_matmul_params + mixtral.embedding_params) / 1e9, 1) == 12.9


@pytest.mark.parametrize("written, hub_id", [
    ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"), ("meta-llama/llama-3.1-8b", "meta-llama/Llama-3.1-8B"),
    ("Llama-3.1-8B", "meta-llama/Llama-3.1-8B"), ("qwen/qwen2.5-72b", "Qwen/Qwen2.5-72B"),
    ("huggyllama/llama-30b", "huggyllama/llama-30b"), ("llama-3b", None), ("meta-llama/Llama-3.1-9B", None),
])
def test_models_are_named_as_users_write_them(written, hub_id):
    assert catalogued(written) == hub_id


def test_a_local_folder_of_another_family_resolves_and_one_the_planner_cannot_describe_is_one_line(tmp_path):
    from shardkit.errors import UsageError

    (tmp_path / "config.json").write_text(json.dumps(catalogue()["Qwen/Qwen2.5-7B"]["config"]))
    name, config, weights = resolve_name(str(tmp_path))
    assert config["model_type"] == "qwen2" and weights is None
    for model_type, says in [("gpt2", "its decoder layer GPT2Block holds ln_1.weight (3584,), ln_1.bias (3584,)"),
                             ("no-such-family", "cannot build it as a causal LM (Unrecognized model identifier")]:
        with pytest.raises(UsageError) as error:
            architecture_of({**config, "model_type": model_type}, str(tmp_path / "config.json"))
        message = str(error.value)
        assert message.startswith(f"{tmp_path / 'config.json'}: model_type {model_type!r} (no rule here for it; "
                                  "rules for llama, mistral") and says in message and "\n" not in message, message


TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512, "bos_token_id": 0,
        "eos_token_id": 0, "pad_token_id": 0}
# Families with no rule in spec/architecture.py's table, each at tiny sizes with what sets it apart, and what
# each family's modelling code is known to give: head_dim (128 where the family fixes it, not hidden / heads),
# the MLP's or each expert's intermediate size, experts, weight-only norms per layer (Cohere's one before its
# parallel attention and MLP, Gemma 3's four), per-head q/k norms, q/k/v biases (Seed-OSS's), tied embeddings.
NO_RULE = {
    "granite": ({}, 16, 128, 0, 2, False, False, False), "cohere": ({}, 16, 128, 0, 1, False, False, True),
    "exaone4": ({}, 16, 128, 0, 2, True, False, False), "seed_oss": ({}, 128, 128, 0, 2, False, True, False),
    "ernie4_5": ({}, 128, 128, 0, 2, False, False, True), "ministral3": ({}, 128, 128, 0, 2, False, False, False),
    "gemma3_text": ({"head_dim": 32, "sliding_window": 64}, 32, 128, 0, 4, True, False, True),
    "qwen3_moe": ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [],
                   "decoder_sparse_step": 1}, 16, 32, 4, 2, True, False, False),
    "granitemoe": ({"num_local_experts": 4, "num_experts_per_tok": 2}, 16, 128, 4, 2, False, False, False),
}


@pytest.mark.parametrize("model_type", sorted(NO_RULE))
def test_a_family_without_a_rule_is_described_exactly_from_the_model_transformers_builds(model_type):
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type}")
    extra, *expected = NO_RULE[model_type]
    config = {**TINY, "model_type": model_type, **extra}
    arch = architecture_of(config, model_type)
    assert model_type not in FAMILIES and arch.inferred
    assert arch.kv_heads == 2 and [arch.head_dim, arch.intermediate, arch.experts, arch.norms_per_layer,
                                   arch.qk_norm, arch.qkv_bias, arch.tied] == expected
    model = build_model(ModelSpec(model_type, config, None), "eager", 0, meta=True)
    assert arch.parameter_counts() == measured_parameter_counts(model)
    assert decoder_layer_class(model).__name__ == decoder_layer_of(config)


# Published configs' own keys at tiny sizes, for families whose layer the description cannot hold.
CANNOT_HOLD = {
    "gpt2": ({"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256}, "attn.c_attn.weight (64, 192)"),
    "phi3": ({**TINY, "num_key_value_heads": 4}, "self_attn.qkv_proj.weight (192, 64)"),
    "olmo2": ({**TINY, "num_key_value_heads": 4}, "holds self_attn.q_norm.weight (64,), self_attn.k_norm"),
    "falcon": ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256},
               "self_attention.query_key_value.weight"),
}


@pytest.mark.parametrize("model_type", sorted(CANNOT_HOLD))
def test_a_family_whose_layer_the_description_cannot_hold_is_one_line_naming_what_it_holds(model_type):
    from shardkit.errors import UsageError

    config, says = CANNOT_HOLD[model_type]
    with pytest.raises(UsageError) as error:
        architecture_of({**config, "model_type": model_type}, "folder/config.json")
    message = str(error.value)
    assert message.startswith(f"folder/config.json: model_type {model_type!r} (no rule here") and says in message \
        and "\n" not in message, message


def test_a_family_without_a_rule_plans_only_the_sizes_its_file_gives():
    from shardkit.errors import UsageError

    with pytest.raises(UsageError, match=r"model_type 'gpt2' .*: no integer hidden_size \(n_embd\)$"):
        architecture_of({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "vocab_size": 256}, "c.json")
    with pytest.raises(UsageError, match=r"model_type 'granite' .*: no integer intermediate_size$"):
        architecture_of({k: v for k, v in TINY.items() if k != "intermediate_size"} | {"model_type": "granite"},
                        "c.json")


def test_a_plan_for_a_family_without_a_rule_says_what_it_was_planned_from(tmp_path, capsys):
    from shardkit.cli import main

    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "granite"}))
    assert main(["plan", "--model", str(tmp_path), "--gpus", "2", "--gpu", "l4"]) == 0
    out = capsys.readouterr().out
    assert "note: model_type 'granite' has no rule in the planner's table" in out and "--trace" in out, out


TRACES = json.loads((Path(__file__).resolve().parents[1] / "docs" / "planner-traces.json").read_text())


def analytic_allocated(trace: dict) -> int:
    from shardkit import planner
    from shardkit.spec.parallelism import Parallelism

    arch = architecture_of(catalogue()[trace["model"]]["config"], trace["model"])
    w = planner.workload(trace["model"], Parallelism("fsdp", False), 8, trace["micro_batch"], True, 1,
                         "sdpa" if arch.sdpa else "eager", trace["seq_len"], beyond_context=True)
    return planner.predict(w, "today").allocated


def test_every_dense_catalogued_model_was_traced_at_both_batches_and_lengths():
    dense = {h for h, e in catalogue().items() if not architecture_of(e["config"], h).moe}
    cases = {(t["model"], t["micro_batch"], t["seq_len"]) for t in TRACES["traces"]}
    assert cases == {(h, b, s) for h in dense for b in (1, 2) for s in (2048, 8192)}


@pytest.mark.parametrize("trace", TRACES["traces"], ids=lambda t: f"{t['model']}-mb{t['micro_batch']}-s{t['seq_len']}")
def test_the_analytic_fsdp2_peak_lies_within_5_percent_of_the_trace(trace):
    """The traces are real: benchmarks/trace_vs_analytic.py ran `shardkit plan --trace`'s code for each (a CPU,
    fake tensors; versions in the file). The analytic side is recomputed here, so a change to the terms is
    held to them; docs/planner.md explains every difference beyond 2%."""
    assert analytic_allocated(trace) == pytest.approx(trace["allocated"], rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["meta-llama/Llama-3.1-8B", "google/gemma-2-9b"])
def test_the_committed_traces_are_what_the_trace_mode_gives_now(model):
    from shardkit.planner import trace

    recorded = next(t for t in TRACES["traces"] if t["model"] == model and t["micro_batch"] == 1
                    and t["seq_len"] == 2048)
    arch = architecture_of(catalogue()[model]["config"], model)
    now = trace.trace(ModelSpec(model, catalogue()[model]["config"], None), "fsdp", 8, 1, 2048, "today",
                      "sdpa" if arch.sdpa else "eager", True, False)
    assert now.allocated == recorded["allocated"] and now.reserved == recorded["reserved"]


def test_a_trace_runs_sdpa_without_a_mask_and_with_grouped_heads_as_a_real_run_does(monkeypatch):
    """transformers reads the positions to skip the causal mask, which it will not on fake tensors: without
    the trace's correction it passes SDPA a T x T mask and k and v repeated to every head, and a Llama-3.1-8B
    trace without checkpointing at 8192 tokens held 7 GiB (9%) more than a real run would."""
    import torch
    from transformers import masking_utils

    from shardkit.planner.trace import record_steps

    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def seen(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append((key.shape[1], attn_mask is None, kwargs.get("is_causal")))
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", seen)
    packed = masking_utils.find_packed_sequence_indices
    config = {**TINY, "model_type": "llama", "hidden_size": 256, "num_attention_heads": 8,
              "intermediate_size": 512, "max_position_embeddings": 1024}
    record_steps(ModelSpec("tiny-gqa", config, None), 2, 1, 640, "today", "sdpa", grad_ckpt=False, steps=1)
    assert calls and set(calls) == {(2, True, True)}, calls  # 2 key-value heads of 8, no mask, causal
    assert masking_utils.find_packed_sequence_indices is packed
