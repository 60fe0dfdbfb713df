"""What the caching allocator reserves beyond live tensors: the allocator model's rules, the planner's three
figures (allocated, reserved, nvidia-smi) against a measured row, a replay of a full-size FSDP2 step's real
allocation order through the allocator model, and torch's FSDPMemTracker against the planner's terms."""

import json

import pytest

from shardkit import cli, planner
from shardkit.planner import allocator as ca
from shardkit.spec import recipes
from shardkit.spec.parallelism import Parallelism

GIB = 2**30
MIB = 2**20

# Measured on an H100 80GB: one rank of LLaMA-7B FSDP2 on 8 ranks, replayed with a fake process group (no
# communicator), today's stack, eager attention, checkpointing, batch 1, shardkit's fused AdamW.
MEASURED_7B_8 = {"allocated": 17.04 * GIB, "reserved": 22.61 * GIB, "nvidia_smi": 23.88 * GIB}


def llama(name: str):
    from shardkit.spec.presets import PRESETS, ModelSpec

    return ModelSpec(name, PRESETS[name], None)


def seven_b_eight():
    return planner.predict_recipe(recipes.load_recipe("llama-7b_fsdp_8gpu_bs1"), "today")


# The allocator model's rules (c10/cuda/CUDACachingAllocator.cpp, default configuration).

def test_sizes_round_to_512_bytes_and_segments_follow_the_three_size_classes():
    assert ca.round_size(1) == 512 and ca.round_size(513) == 1024
    assert ca.segment_size(1 * MIB) == 2 * MIB  # small pool: 2 MiB segments
    assert ca.segment_size(1 * MIB + 512) == 20 * MIB  # 1-10 MiB: a 20 MiB segment
    assert ca.segment_size(10 * MIB + 1) == 12 * MIB  # large: rounded up to 2 MiB


def test_a_freed_block_serves_only_its_own_stream():
    r = ca.replay([("alloc", 1, 100 * MIB, "a"), ("free", 1), ("alloc", 2, 100 * MIB, "b")])
    assert r.peak_reserved == 200 * MIB and r.peak_allocated == 100 * MIB
    same = ca.replay([("alloc", 1, 100 * MIB, "a"), ("free", 1), ("alloc", 2, 100 * MIB, "a")])
    assert same.peak_reserved == 100 * MIB


def test_best_fit_splits_and_a_long_lived_tensor_strands_the_rest():
    # A 16 MiB tensor carved from a freed 512 MiB block leaves 496 MiB: the next 512 MiB request needs a new
    # segment. The fragmentation the planner states as its uncertainty, in two lines.
    events = [("alloc", 1, 512 * MIB, None), ("free", 1), ("alloc", 2, 16 * MIB, None),
              ("alloc", 3, 512 * MIB, None)]
    r = ca.replay(events)
    assert r.peak_reserved == 1024 * MIB and r.peak_allocated == 528 * MIB
    # Freed neighbours merge back: once the 16 MiB tensor goes, the first segment serves 512 MiB again.
    merged = ca.replay([*events, ("free", 2), ("free", 3), ("alloc", 4, 512 * MIB, None),
                        ("alloc", 5, 512 * MIB, None)])
    assert merged.peak_reserved == 1024 * MIB


def test_a_large_block_is_not_split_for_a_remainder_of_1_mib_or_less():
    # 21 MiB gets a 22 MiB segment (rounded to 2 MiB); the 1 MiB left is not split off: the tensor holds 22.
    assert ca.replay([("alloc", 1, 21 * MIB, None)]).peak_allocated == 22 * MIB
    # 20 MiB from a cached 22 MiB block leaves 2 MiB (> 1 MiB): split, so the tensor holds 20.
    r = ca.replay([("alloc", 1, 21 * MIB, None), ("free", 1), ("alloc", 2, 20 * MIB, None)])
    assert r.peak_reserved == 22 * MIB and r.segments == 1


# The planner's three figures.

def test_three_figures_are_named_as_torch_and_nvidia_smi_name_them(capsys):
    assert cli.main(["plan", "llama-7b_fsdp_8gpu_bs1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpu_allocated_bytes"] <= d["gpu_reserved_bytes"] <= d["gpu_nvidia_smi_bytes"]
    assert d["gpu_nvidia_smi_bytes"] == d["gpu_reserved_bytes"] + d["gpu_context_bytes"] + d["gpu_communicator_bytes"]
    assert d["gpu_reported_bytes"] == d["gpu_nvidia_smi_bytes"] and "fused" in d["optimizer"]
    reserve = [t for t in d["terms"] if t["kind"] == "reserve"]
    assert reserve and d["gpu_reserved_bytes"] - d["gpu_allocated_bytes"] == sum(t["bytes"] for t in reserve)


def test_the_verdict_uses_what_nvidia_smi_shows_and_says_at_capacity_within_the_uncertainty():
    p = seven_b_eight()
    edge = p.nvidia_smi + p.reserve_uncertainty // 2
    at_edge = planner.predict(p.workload, "today", gpu_memory=edge)
    assert at_edge.live < edge and at_edge.verdict == "at capacity" and at_edge.reported == at_edge.nvidia_smi
    roomy = planner.predict(p.workload, "today", gpu_memory=p.nvidia_smi + p.reserve_uncertainty + 1)
    assert roomy.verdict == "fits"
    assert planner.predict(p.workload, "today", gpu_memory=p.live - 1).verdict == "oom"


def test_the_copy_in_pool_term_is_the_root_and_first_layer_gathers_less_the_prefetched_unit():
    p = seven_b_eight()
    s, n = p.workload.shape, 8
    unit, root = s.layer_params, 2 * s.embedding_params + s.hidden
    (term,) = [t for t in p.terms if t.kind == "reserve"]
    assert term.bytes == int(2 * (root + unit) * (1 + 1 / n) - 2 * unit)


def test_7b_on_8_ranks_allocated_within_10_percent_of_the_measured():
    assert seven_b_eight().allocated == pytest.approx(MEASURED_7B_8["allocated"], rel=0.10)


@pytest.mark.xfail(strict=True, reason="the reserve model lacks the compute stream's fragmentation: reserved is "
                                       "21% and nvidia-smi 20% below the measured (docs/planner.md)")
@pytest.mark.parametrize("figure", ["reserved", "nvidia_smi"])
def test_7b_on_8_ranks_reserved_and_nvidia_smi_within_10_percent_of_the_measured(figure):
    assert getattr(seven_b_eight(), figure) == pytest.approx(MEASURED_7B_8[figure], rel=0.10)


def test_the_measured_nvidia_smi_less_reserved_is_the_context_term():
    # No communicator under a fake process group: what NVML adds to reserved is the CUDA context alone.
    measured = MEASURED_7B_8["nvidia_smi"] - MEASURED_7B_8["reserved"]
    assert seven_b_eight().context == pytest.approx(measured, rel=0.05)


# Full-size traces on CPU (fake tensors, fake process group): about 25 s each on 2 cores.

@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["llama-7b", "llama-13b"])
def test_a_full_size_step_replayed_through_the_allocator_model(model_name):
    """Two training steps of rank 0 on 8 ranks, their allocations recorded in order with their streams,
    replayed through the allocator model: its allocated peak is the planner's within 5% (the planner counts
    every gradient shard at the backward's peak; the trace has about 90% of them then), its reserved lies
    between the planner's reserved and reserved + the stated uncertainty (7B: 19.7 GiB in [17.9, 20.9];
    13B: 34.6 in [31.7, 35.8])."""
    from shardkit.planner.trace import record_steps

    events = record_steps(llama(model_name), 8, 1, 2048, "today", "eager")
    r = ca.replay([e for e in events if e[0] != "mark"])
    p = planner.predict(planner.workload(model_name, Parallelism("fsdp", False), 8, 1, True, 1), "today")
    assert r.peak_allocated == pytest.approx(p.allocated, rel=0.05)
    assert p.reserved <= r.peak_reserved <= p.reserved + p.reserve_uncertainty
    if model_name == "llama-7b":
        # Against the H100 measurement the replay's order alone leaves reserved 13% short: the real run's
        # CUDA-only allocations and first-step initialization are not in the CPU trace (docs/planner.md).
        assert r.peak_reserved < 0.9 * MEASURED_7B_8["reserved"]


def _tracked_peak(model_name: str, world: int = 8) -> dict:
    """FSDPMemTracker's peak snapshot, by category, of the second of two steps (the first creates the
    optimizer's states): meta build, fully_shard, to_empty in fake mode,
    for-loop AdamW (the foreach path does not trace there)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from shardkit.planner.trace import fake_rank_model

    spec = llama(model_name)
    model = fake_rank_model(spec, world, "eager")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
        ids = torch.randint(0, spec.hf_config["vocab_size"], (1, spec.hf_config["max_position_embeddings"]))
        tracker = FSDPMemTracker(model, optimizer)
        with tracker:
            for step in range(2):
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step == 0:
                    tracker.reset_mod_stats()
        (peak,) = tracker.get_tracker_snapshot("peak").values()
    return {getattr(k, "value", k): v for k, v in peak.items()}


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["llama-7b", "llama-13b"])
def test_fsdp_mem_tracker_agrees_with_the_planner(model_name):
    """torch's FSDPMemTracker at full size, 8 ranks, batch 1, against the planner's allocated figure and,
    where its categories match the planner's terms, term by term."""
    tracked = _tracked_peak(model_name)
    w = planner.workload(model_name, Parallelism("fsdp", False), 8, 1, True, 1)
    p = planner.predict(w, "today")
    terms = {t.name: t.bytes for t in p.terms}
    s = w.shape
    unit = s.layer_params
    assert tracked["Sharded Param"] == terms["fp32 parameter shard"]
    # The tracker also counts AdamW's per-parameter step counter (one fp32 scalar per parameter tensor).
    tensors = 9 * s.layers + 3
    assert tracked["OptState"] == terms["Adam exp_avg + exp_avg_sq, fp32"] + 4 * tensors
    # The root and two layer units unsharded: the current one as parameters, the prefetched one still in its
    # flat all-gather output.
    assert tracked["Unsharded Param"] + tracked["All Gather"] == pytest.approx(
        terms["root unit unsharded (embeddings, LM head, norm)"] + terms["two layer units unsharded (current + prefetched)"],
        rel=1e-3)
    assert tracked["Reduce Scatter"] == pytest.approx(4 * unit, rel=1e-3)  # the fp32 reduce-scatter input
    # The peak comes before the last units' gradients are reduced: the planner's full shard is an upper bound.
    assert 0.85 * terms["fp32 gradient shard"] <= tracked["Sharded Grad"] <= terms["fp32 gradient shard"]
    # Total: the planner over-counts by at most the gradients not yet reduced and its layer-phase rounding.
    assert tracked["Total"] <= p.allocated <= 1.07 * tracked["Total"]
