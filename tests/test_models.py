"""The model description (spec/architecture.py) against the models transformers builds, for every catalogued
published configuration, and the catalogue itself."""

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


def test_a_local_folder_of_another_family_resolves_and_an_unknown_family_is_one_line(tmp_path):
    import json

    from shardkit.errors import UsageError

    (tmp_path / "config.json").write_text(json.dumps(catalogue()["Qwen/Qwen2.5-7B"]["config"]))
    name, config, weights = resolve_name(str(tmp_path))
    assert config["model_type"] == "qwen2" and weights is None
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(UsageError) as error:
        architecture_of(json.loads((tmp_path / "config.json").read_text()), str(tmp_path / "config.json"))
    assert "model_type 'gpt2' is not one the planner describes (llama, mistral" in str(error.value)
