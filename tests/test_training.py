"""Real 2-rank runs of the tiny model on CPU (gloo; DeepSpeed with DS_ACCELERATOR=cpu), through every
method of the table and both engines where the CPU allows."""

import json
import resource
import time

import pytest

from conftest import results_of, run_train, tiny

pytestmark = pytest.mark.slow


def sharding_of(output_dir):
    return json.loads((output_dir / "sharding.json").read_text())["per_rank"]


def assert_each_rank_holds_half_of_every_parameter(output_dir):
    per_rank = sharding_of(output_dir)
    assert [r["rank"] for r in per_rank] == [0, 1]
    names = per_rank[0]["parameters"].keys()
    assert len(names) == 2 * 9 + 3  # 2 layers x 9 tensors + embedding, final norm, LM head
    for name in names:
        held = [r["parameters"][name] for r in per_rank]
        whole = held[0]["global"]
        # Every tiny parameter's size is even, so an exact half each (no padding).
        assert [h["local"] for h in held] == [whole // 2, whole // 2], name


@pytest.mark.parametrize("method", ["fsdp", "fsdp_offload", "zero3", "zero3_offload"])
def test_method_shards_trains_and_reports(method, tmp_path):
    out = tmp_path / method
    result = run_train(tiny(out, method, "--max_steps", "8", "--bf16", "True", "--gradient_checkpointing", "True"))
    assert result.returncode == 0, result.stderr[-3000:]
    doc = results_of(out)
    assert doc["status"] == "ok" and doc["exit_code"] == 0 and doc["failure"] is None
    assert doc["run"]["method"] == method and doc["run"]["offload"] == method.endswith("offload")
    assert doc["run"]["world_size"] == 2 and doc["run"]["global_batch"] == 8
    assert_each_rank_holds_half_of_every_parameter(out)
    # Learnable synthetic task: the loss must fall well below its start (ln 256 = 5.55 at random init).
    loss = doc["loss"]
    assert len(loss) == 8 and loss[0] > 5.0
    assert sum(loss[-3:]) / 3 < loss[0] - 0.4, loss
    timing = doc["time"]
    assert len(timing["step_times_s"]) == 8 and all(t > 0 for t in timing["step_times_s"])
    assert timing["steady_state"]["steps"] == 6  # 2 warm-up steps left out
    assert timing["wall_time_source"] == "launcher"
    assert timing["wall_time_s"] > timing["startup_s"] + timing["training_s"] > 0
    assert doc["throughput"]["tokens_per_s"] == pytest.approx(8 * 64 / timing["steady_state"]["median_s"])
    assert doc["throughput"]["mfu"] is None  # CPU: no peak to compare with
    assert doc["memory"]["max_over_ranks"]["host_rss_peak_bytes"] > 0
    assert doc["memory"]["max_over_ranks"]["gpu_max_reserved_bytes"] is None
    assert doc["environment"]["versions"]["torch"] and doc["data"]["fingerprint"].startswith("sha256:")
    # The native engine on today's stack runs expandable segments unless the user's configuration says otherwise.
    assert doc["environment"]["allocator_conf"] == "expandable_segments:True"
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["gradient_checkpointing"] is True and saved["plan"]["world_size"] == 2
    if method == "zero3_offload":  # the seed config pins host memory; a CPU cannot, and the results say so
        assert any("pin_memory=false" in change for change in saved["adaptations"])


@pytest.mark.parametrize("method", ["fsdp", "zero3_offload"])
def test_checkpoints_are_limited_and_resume_gives_the_same_next_loss(method, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    steps = ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2"]
    result = run_train(tiny(straight, method, *steps))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert len(results_of(straight)["time"]["checkpoint_saves_s"]) == 3
    result = run_train(tiny(resumed, method, *steps, "--resume_from_checkpoint", str(straight / "checkpoint-2")))
    assert result.returncode == 0, result.stderr[-3000:]
    after = results_of(resumed)
    assert after["run"]["resumed_from_step"] == 2 and len(after["loss"]) == 1
    assert after["loss"][0] == pytest.approx(results_of(straight)["loss"][2], rel=1e-5)


def _cap_address_space():
    # Whatever the host's overcommit policy, an allocation past 12 GiB must fail, not page the host.
    resource.setrlimit(resource.RLIMIT_AS, (12 * 2**30, 12 * 2**30))


def test_out_of_memory_is_a_result_that_names_rank_step_and_bytes(tmp_path):
    out = tmp_path / "oom"
    # Eager attention scores for 64 sequences of 2048 tokens: 64 x 32 heads x 2048^2 x 4 bytes = 34 GB,
    # while every other activation stays small (hidden 64), so the failure comes at once.
    args = tiny(out, "fsdp", "--per_device_train_batch_size", "64", "--num_attention_heads", "32",
                "--model_max_length", "2048")
    started = time.monotonic()
    result = run_train(args, timeout=300, preexec_fn=_cap_address_space)
    assert time.monotonic() - started < 120  # the other rank did not hang
    assert result.returncode == 3, result.stderr[-3000:]
    doc = results_of(out)
    assert doc["status"] == "oom" and doc["exit_code"] == 3
    failure = doc["failure"]
    assert failure["kind"] == "oom" and failure["rank"] in (0, 1) and failure["step"] == 1
    assert failure["bytes_requested"] == 64 * 32 * 2048 * 2048 * 4
    assert result.stderr.count("Traceback") == 0
    assert "shardkit: oom: rank" in result.stderr


def test_probe_projects_the_full_run(tmp_path):
    out = tmp_path / "probe"
    result = run_train(tiny(out, "fsdp", "--max_steps", "5", "--num_train_epochs", "1", "--num_examples", "400"))
    assert result.returncode == 0, result.stderr[-3000:]
    doc = results_of(out)
    assert doc["run"]["probe"] is True and doc["run"]["steps_full_run"] == 400 // 2 // 4
    projection = doc["time"]["projected_full_run"]
    steady = doc["time"]["steady_state"]
    assert projection["steps"] == 50
    assert projection["wall_time_s"] == pytest.approx(doc["time"]["startup_s"] + 50 * steady["median_s"])
    low, high = projection["range_s"]
    assert low <= projection["wall_time_s"] <= high


def test_hf_engine_runs_zero3_offload(tmp_path):
    out = tmp_path / "hf"
    result = run_train(tiny(out, "zero3_offload", "--engine", "hf", "--max_steps", "6"))
    assert result.returncode == 0, result.stderr[-3000:]
    doc = results_of(out)
    assert doc["status"] == "ok" and doc["run"]["engine"] == "hf"
    assert len(doc["loss"]) == 6 and len(doc["time"]["step_times_s"]) == 6
    assert doc["loss"][-1] < doc["loss"][0]


def test_local_hugging_face_weights_are_loaded_into_the_shards(tmp_path):
    """A folder written by save_pretrained is loaded (rank 0 reads, every rank gets its shards): the run's
    first loss is the saved model's loss on the same first batches, computed here without any sharding."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardkit.engine.data import RankSampler, synthetic

    torch.manual_seed(7)
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "weights")
    out = tmp_path / "run"
    result = run_train(tiny(out, "fsdp", "--model_name_or_path", str(tmp_path / "weights"), "--max_steps", "1",
                            "--num_examples", "64", "--learning_rate", "0"))
    assert result.returncode == 0, result.stderr[-3000:]
    data = synthetic(64, 64, 256, seed=42)
    expected = []
    with torch.no_grad():
        for rank in (0, 1):
            first = list(RankSampler(64, rank, 2, seed=42))[:4]
            batch = data.input_ids[first]
            expected.append(model(input_ids=batch, labels=batch).loss.item())
    assert results_of(out)["loss"][0] == pytest.approx(sum(expected) / 2, rel=1e-5)
