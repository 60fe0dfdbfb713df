"""Resolved runs: model shapes and counts, batch and step arithmetic, DeepSpeed "auto", bad input."""

import json

import pytest

from shardkit.engine.models import build_model, measured_parameter_counts
from shardkit.errors import UsageError
from shardkit.spec.flags import make_config
from shardkit.spec.presets import ModelSpec, parameter_counts, preset_name
from shardkit.spec.resolve import Launch
from shardkit.spec.resolve import resolve as resolve_run


def resolve(cfg, ranks):
    return resolve_run(cfg, Launch(nproc_per_node=ranks)).plan


def built_counts(spec):
    return measured_parameter_counts(build_model(spec, "eager", seed=0, meta=True))


@pytest.mark.parametrize("name, total", [
    # Published LLaMA-1 sizes: 6.7B, 13.0B, 32.5B, 65.2B (Touvron et al. 2023, Table 2).
    ("decapoda-research/llama-7b-hf", 6_738_415_616),
    ("llama-13b", 13_015_864_320),
    ("30b", 32_528_943_616),
    ("decapoda-research/llama-65b-hf", 65_285_660_672),
])
def test_presets_have_the_published_parameter_counts(name, total):
    plan = resolve(make_config({"model_name_or_path": name, "fsdp": "full_shard auto_wrap"}), 8)
    assert plan.parameters["total"] == total
    assert built_counts(plan.model) == plan.parameters


@pytest.mark.parametrize("extra", [
    {},
    {"num_key_value_heads": 2, "tie_word_embeddings": True},
    {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1},
    {"head_dim": 32},
])
def test_resolved_parameter_counts_are_those_of_the_built_model(extra):
    """The resolved run counts parameters by arithmetic (no torch): it must equal transformers' model, also
    for the options a local config.json may set (grouped key-value heads, tied embeddings, biases)."""
    hf_config = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3, "num_attention_heads": 4,
                 "vocab_size": 256, "max_position_embeddings": 64, **extra}
    spec = ModelSpec("local", hf_config, None)
    assert parameter_counts(hf_config) == built_counts(spec)


def test_layer_override_gives_the_7b_layer_shaped_probe():
    cfg = make_config({"model_name_or_path": "llama-7b", "num_hidden_layers": 8, "fsdp": "full_shard"})
    counts = resolve(cfg, 1).parameters
    assert counts["matmul"] == 8 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000  # 1.75e9


def test_seed_fsdp_row_arithmetic():
    cfg = make_config({"model_name_or_path": "llama-30b", "fsdp": "full_shard auto_wrap offload",
                       "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "warmup_ratio": 0.03})
    plan = resolve(cfg, 8)
    assert plan.global_batch == 64 and plan.seq_len == 2048
    assert plan.steps_per_epoch == 6000 // 8 // 1 // 8  # 93 optimizer steps per epoch
    assert plan.full_run_steps == plan.total_steps == 279
    assert plan.warmup_steps == 9  # ceil(0.03 x 279), as HF Trainer computes it


def test_max_steps_is_a_probe_of_the_full_run():
    cfg = make_config({"fsdp": "full_shard", "max_steps": 5, "per_device_train_batch_size": 2})
    plan = resolve(cfg, 2)
    assert plan.total_steps == 5 and plan.full_run_steps == 3 * (6000 // 2 // 2)


def test_deepspeed_auto_values_resolved_from_flags(seed_ds_config):
    cfg = make_config({"model_name_or_path": "llama-13b", "deepspeed": str(seed_ds_config), "bf16": True,
                       "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "learning_rate": 2e-5,
                       "warmup_ratio": 0.03})
    ds = resolve(cfg, 4).deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 64
    assert ds["optimizer"]["params"]["lr"] == 2e-5 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5120 * 5120
    assert ds["scheduler"]["params"]["total_num_steps"] == 3 * (6000 // 4 // 8 // 2)
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}


def test_explicit_deepspeed_batch_that_contradicts_the_flags(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(UsageError, match="train_micro_batch_size_per_gpu is 4 but the flags give 1"):
        resolve(make_config({"deepspeed": str(path), "per_device_train_batch_size": 1}), 2)


@pytest.mark.parametrize("values, ranks, fragment", [
    ({"model_name_or_path": "gpt-j-6b"}, 2, "--model_name_or_path 'gpt-j-6b': not a catalogued model"),
    ({"data_path": "/nonexistent/alpaca.json"}, 2, "--data_path '/nonexistent/alpaca.json': no such file"),
    ({"num_examples": 3}, 4, "4 ranks but only 3 examples"),
    ({"num_examples": 16, "per_device_train_batch_size": 8}, 4, "needs more than the 16 examples"),
    ({"deepspeed": "/nonexistent/ds.json", "fsdp": ""}, 2, "--deepspeed '/nonexistent/ds.json': no such file"),
])
def test_bad_input_names_the_problem(values, ranks, fragment):
    values = {"fsdp": "full_shard", **values}
    with pytest.raises(UsageError, match=None) as error:
        resolve(make_config(values), ranks)
    assert fragment in str(error.value)


def test_malformed_deepspeed_json_names_file_and_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 3},\n  "bf16": {"enabled": true,}\n}\n')
    with pytest.raises(UsageError) as error:
        resolve(make_config({"deepspeed": str(path)}), 2)
    assert str(error.value).startswith(f"{path}:3:")


def test_no_parallel_method_is_refused():
    with pytest.raises(UsageError, match="no parallel method"):
        resolve(make_config({}), 1)


def test_preset_names():
    assert preset_name("decapoda-research/llama-7b-hf") == "llama-7b"
    assert preset_name("13B") == "llama-13b"
    assert preset_name("llama-70b") is None


def test_the_method_comes_from_the_deepspeed_json_and_a_recipe_must_agree_with_it(tmp_path, seed_ds_config):
    from shardkit.orchestration.campaign import resolve_row
    from shardkit.spec import recipes

    assert resolve(make_config({"deepspeed": str(seed_ds_config)}), 2).parallelism.name == "zero3_offload"
    no_offload = seed_ds_config.parent / "zero3_no_offload.json"
    assert resolve(make_config({"deepspeed": str(no_offload)}), 2).parallelism.name == "zero3"
    # A recipe's METHOD picks its JSON; METHOD=zero3 no longer runs the seed's offloading config.
    (tmp_path / "configs").mkdir()
    for file in seed_ds_config.parent.glob("*.json"):
        (tmp_path / "configs" / file.name).write_text(file.read_text())
    (tmp_path / "tiny_z.env").write_text("MODEL=tiny\nMETHOD=zero3\nGPUS=2\nBATCH=4\nGRAD_CKPT=True\n")
    row = resolve_row(recipes.load_recipe("tiny_z", folder=tmp_path), tmp_path / "out", [], None)
    assert row.run.plan.parallelism.name == "zero3"
    assert "offload_param" not in row.run.plan.deepspeed_config["zero_optimization"]
    (tmp_path / "tiny_c.env").write_text("MODEL=tiny\nMETHOD=zero3\nGPUS=2\nBATCH=4\nGRAD_CKPT=True\n"
                                         "DEEPSPEED_CONFIG=configs/deepspeed_config.json\n")
    with pytest.raises(UsageError, match="METHOD zero3 contradicts") as error:
        resolve_row(recipes.load_recipe("tiny_c", folder=tmp_path), tmp_path / "out", [], None)
    assert "\n" not in str(error.value)


def test_a_deepspeed_json_that_offloads_half_is_refused(tmp_path, seed_ds_config):
    config = json.loads(seed_ds_config.read_text())
    del config["zero_optimization"]["offload_param"]
    path = tmp_path / "half.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UsageError, match="offloads only one of offload_optimizer and offload_param"):
        resolve(make_config({"deepspeed": str(path)}), 2)


def test_trace_mode_prints_its_figures_beside_the_analytic_ones_and_zero3_keeps_the_analytic(capsys):
    from shardkit import cli

    assert cli.main(["plan", "tiny_fsdp_2cpu_bs4", "tiny_zero3_2cpu_bs4", "--trace"]) == 0
    out = capsys.readouterr().out
    assert "trace of tiny_fsdp_2cpu_bs4: FSDP2, rank 0 of 2 on a fake process group" in out
    for figure in ("allocated", "reserved", "nvidia-smi"):
        line = next(x for x in out.splitlines() if x.strip().startswith(figure))
        _, analytic, unit, traced, unit2, difference = line.split()
        assert float(analytic) > 0 and float(traced) > 0 and {unit, unit2} <= {"MiB", "GiB"}
        assert difference.endswith("%")
    assert ("trace of tiny_zero3_2cpu_bs4: not run (DeepSpeed ZeRO-3 cannot run on a fake process group); the "
            "analytic figures stand") in out


def test_trace_json_carries_the_traced_figures(capsys):
    import json

    from shardkit import cli

    assert cli.main(["plan", "tiny_fsdp_2cpu_bs4", "--trace", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert 0 < d["trace"]["allocated_bytes"] <= d["trace"]["reserved_bytes"] < d["trace"]["nvidia_smi_bytes"]
    assert d["trace"]["host_peak_bytes"] > 0
