"""The time model, term by term, on cases small enough to compute by hand: a known FLOP count at a known rate,
a known byte count over a known link, the host's share for the CPU optimizer, how terms combine, the run's
length, and the hardware table."""

import dataclasses

import pytest

from shardkit import planner
from shardkit.planner import hardware as hwm
from shardkit.planner import memory_model as mm
from shardkit.planner import time_model as tm
from shardkit.spec.parallelism import Parallelism

P7 = 6_738_415_616  # LLaMA-7B's parameters
# A card with round rates, so every expected value below is arithmetic on the counts.
ROUND = hwm.Card("round card", 1e3, "test", hbm_bytes_per_s=1e2, nvlink_bytes_per_s=1e9, pcie_bytes_per_s=2e9,
                 source="test", device_names=())
ROUND_HOST = hwm.Host("round host", cores=10, memory_bytes_per_s=100e9, gpus_per_pcie_uplink=2, source="test")
ROUND_HW = hwm.Hardware(ROUND, ROUND_HOST)
# h=4, I=8, one layer, one head, vocabulary 10.
SMALL = mm.Architecture(hidden=4, intermediate=8, layers=1, heads=1, vocab=10)


def small(ckpt=False, attention="sdpa", method="fsdp", offload=False, gpus=1, accumulation=1):
    return mm.Workload(SMALL, Parallelism(method, offload), gpus, micro_batch=1, seq_len=2, grad_ckpt=ckpt,
                       accumulation=accumulation, attention=attention)


def seven_b(method="fsdp", offload=False, gpus=8, batch=1, accumulation=8, ckpt=True):
    return planner.workload("llama-7b", Parallelism(method, offload), gpus, batch, ckpt, accumulation)


def by_name(terms):
    return {t.name: t for t in terms}


def test_matmul_term_is_a_known_flop_count_at_a_known_rate():
    # matmul parameters: 4h^2 + 3hI = 64 + 96 in the layer, hV = 40 in the LM head: 200.
    assert SMALL.matmul_params == 200
    # 6 x 200 + 12 x L h s = 1200 + 96 FLOPs per token; 2 tokens; at 1000 FLOP/s.
    plain = by_name(tm.compute_terms(small(), "today", ROUND_HW))["matmuls (model FLOPs + recomputation)"]
    assert (plain.amount, plain.seconds) == (2592, pytest.approx(2.592))
    # Recomputing the layer adds 2 x 200 + 4 x L h s = 432 FLOPs per token.
    ckpt = by_name(tm.compute_terms(small(ckpt=True), "today", ROUND_HW))["matmuls (model FLOPs + recomputation)"]
    assert ckpt.seconds == pytest.approx((2592 + 2 * 432) / 1e3)
    # A run's own measured rate replaces the card's.
    measured = dataclasses.replace(ROUND_HW, measured_matmul_flops=2e3)
    assert by_name(tm.compute_terms(small(), "today", measured))["matmuls (model FLOPs + recomputation)"].seconds == \
        pytest.approx(1.296)


def test_memory_bound_terms_are_byte_counts_over_hbm():
    # Elementwise: (124h + 10I) = 576 bytes per token per layer forward, twice that backward; 2 tokens.
    terms = by_name(tm.compute_terms(small(), "today", ROUND_HW))
    assert terms["norms, rotary, SwiGLU, residuals"].amount == 576 * 3 * 2
    assert "eager attention's score tensors" not in terms  # SDPA keeps the scores on chip
    # Eager: a b s^2 = 4 scores; today 32 bytes forward + 36 backward, and a second forward when recomputing.
    eager = by_name(tm.compute_terms(small(attention="eager"), "today", ROUND_HW))["eager attention's score tensors"]
    assert (eager.amount, eager.seconds) == (4 * (32 + 36), pytest.approx(4 * 68 / 1e2))
    old = by_name(tm.compute_terms(small(attention="eager", ckpt=True), "2023", ROUND_HW))
    assert old["eager attention's score tensors"].amount == 4 * (2 * 36 + 42)


def test_gpu_optimizer_and_no_sync_accumulation():
    w = small(gpus=1, accumulation=4)
    terms = by_name(tm.compute_terms(w, "2023", ROUND_HW))
    local = mm.local_elements(w, "2023")
    assert terms["optimizer step on the GPU"].amount == (72 + 12) * local  # adamw_hf + FSDP's clip
    assert terms["optimizer step on the GPU"].lane == "exposed"
    assert terms["gradients accumulated unsharded under no_sync()"].amount == 6 * SMALL.params * 3
    fused = by_name(tm.compute_terms(w, "today", ROUND_HW))
    assert fused["optimizer step on the GPU"].amount == (28 + 12) * local
    assert "gradients accumulated unsharded under no_sync()" not in fused
    assert "optimizer step on the GPU" not in by_name(tm.compute_terms(small(offload=True), "today", ROUND_HW))


def test_collectives_are_known_byte_counts_over_a_known_link():
    # 2023 FSDP on 2 GPUs, 8 micro-batches, checkpointing: 3 gathers of 2 bytes x P per micro-batch, each GPU
    # moving half of it; one bf16 reduce-scatter per step (no_sync).
    terms = by_name(tm.communication_terms(seven_b(gpus=2), "2023", hwm.REFERENCE))
    gathers = terms["parameter all-gathers (3 per micro-batch)"]
    assert gathers.amount == pytest.approx(8 * 3 * 2 * P7 / 2)  # 24 P bytes
    assert gathers.seconds == pytest.approx(24 * P7 / 300e9)  # A100 NVLink: 300 GB/s per direction
    assert terms["gradient reduce-scatters"].amount == pytest.approx(2 * P7 / 2)
    # FSDP2 (today): 2 gathers, and an fp32 reduce-scatter after every micro-batch.
    today = by_name(tm.communication_terms(seven_b(gpus=4), "today", hwm.REFERENCE))
    assert today["parameter all-gathers (2 per micro-batch)"].amount == pytest.approx(8 * 2 * 2 * P7 * 3 / 4)
    assert today["gradient reduce-scatters"].amount == pytest.approx(8 * 4 * P7 * 3 / 4)
    # ZeRO-3: bf16 reduce-scatter every micro-batch; over PCIe the same bytes take the PCIe rate.
    pcie = hwm.REFERENCE.with_link("pcie")
    zero3 = by_name(tm.communication_terms(seven_b("zero3", accumulation=2), "2023", pcie))
    assert zero3["gradient reduce-scatters"].seconds == pytest.approx(2 * 2 * P7 * 7 / 8 / 32e9)
    assert tm.communication_terms(seven_b(gpus=1), "today", hwm.REFERENCE) == []


def test_offload_traffic_and_the_cpu_optimizer():
    w = seven_b("zero3", offload=True, gpus=4, accumulation=2)
    local = mm.local_elements(w, "2023")
    terms = by_name(tm.offload_terms(w, "2023", ROUND_HW))
    pcie = 2e9 / 2  # two GPUs share one switch uplink
    assert terms["bf16 parameter partitions fetched to the GPU"].amount == 2 * 2 * 2 * local
    assert terms["bf16 parameter partitions fetched to the GPU"].seconds == pytest.approx(8 * local / pcie)
    assert terms["bf16 gradient partitions into the pinned host buffer"].amount == 2 * 2 * local
    assert terms["fp32 gradients copied at the accumulation boundary"].lane == "exposed"
    # One thread per rank (torchrun's OMP_NUM_THREADS=1) gets one core's share: 100 GB/s / 10 cores.
    cpu = terms["gradient scaling, CPU Adam, bf16 copy on the host"]
    assert cpu.seconds == pytest.approx(42 * local / 10e9)
    fsdp = by_name(tm.offload_terms(seven_b(offload=True, gpus=2), "2023", ROUND_HW))
    local = mm.local_elements(seven_b(offload=True, gpus=2), "2023")
    assert fsdp["fp32 parameter shards copied to the GPU"].amount == 8 * 3 * 4 * local
    assert fsdp["fp32 gradient shards copied to the host"].amount == 4 * local  # once: no_sync
    assert fsdp["clipping and AdamW on the host"].seconds == pytest.approx(84 * local / 10e9)
    today = by_name(tm.offload_terms(seven_b(offload=True, gpus=2), "today", ROUND_HW))
    assert today["fp32 gradient shards copied to the host"].amount == 8 * 4 * local
    assert today["gradients accumulated on the host"].amount == 7 * 12 * local
    assert tm.offload_terms(seven_b(), "2023", ROUND_HW) == []


def test_one_rank_keeps_every_core():
    assert tm.cpu_threads(seven_b(gpus=1), ROUND_HW) == 10
    assert ROUND_HW.host_thread_bytes_per_s(10) == 100e9 and ROUND_HW.host_thread_bytes_per_s(1) == 10e9
    assert ROUND_HW.host_link_bytes_per_s(1) == 2e9 and ROUND_HW.host_link_bytes_per_s(8) == 1e9


def term(lane, seconds, group="compute"):
    return tm.TimeTerm(group, f"{lane} {seconds}", seconds, "B", 1.0, "test", lane, "test")


def test_overlapping_lanes_take_the_slowest_and_exposed_terms_add():
    terms = [term("gpu", 2), term("gpu", 1), term("link", 5, "communication"), term("host to GPU", 4),
             term("exposed", 1, "CPU optimizer"), term("exposed", 0.5)]
    assert tm.step_seconds(terms) == pytest.approx(5 + 1.5)
    assert tm.step_seconds([term("exposed", 2)]) == 2


def test_run_is_steps_saves_and_start_up():
    assert tm.optimizer_steps(seven_b()) == 279  # 6000 // 8 // 1 // 8 = 93 per epoch, 3 epochs
    assert tm.optimizer_steps(planner.workload("llama-30b", Parallelism("zero3", True), 4, 6, True, 2)) == 375
    w = seven_b(gpus=2)  # 1125 steps: 11 saves
    t = tm.predict_time(w, "2023", hwm.REFERENCE)
    assert (t.steps, t.saves) == (1125, 11)
    assert t.run_seconds == pytest.approx(1125 * t.step_seconds + 11 * t.save_seconds + t.startup_seconds)
    # HF 4.28 with FSDP: rank 0 writes the full fp32 model and its optimizer shard, at one thread's share.
    assert t.save_seconds == pytest.approx((4 * P7 + 8 * mm.local_elements(w, "2023")) / 3.2e9)
    assert tm.predict_time(dataclasses.replace(w, save_every=None), "2023", hwm.REFERENCE).saves == 0


def test_the_dominant_term():
    assert planner.predict(seven_b(), "2023").time.dominant == "compute"
    offloaded = planner.workload("llama-65b", Parallelism("zero3", True), 8, 1, True, 2)
    assert planner.predict(offloaded, "2023").time.dominant == "CPU optimizer"
    slow_link = dataclasses.replace(hwm.REFERENCE, card=dataclasses.replace(hwm.CARDS["a100"], nvlink_bytes_per_s=1e9))
    assert planner.predict(seven_b(), "2023", hardware=slow_link).time.dominant == "communication"


@pytest.mark.parametrize("name,card", [("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA H100 80GB HBM3", "h100"),
                                       ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-40GB", "a100-sxm-40gb"),
                                       ("NVIDIA A100 80GB PCIe", "a100-pcie-80gb"), ("NVIDIA H100 PCIe", "h100-pcie"),
                                       ("NVIDIA H100 NVL", "h100-nvl"), ("NVIDIA L40S", "l40s"), ("NVIDIA L4", "l4"),
                                       ("NVIDIA A10G", "a10g"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
                                       ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada"), ("NVIDIA B200", "b200"),
                                       ("NVIDIA GeForce GTX 1080", None), (None, None)])
def test_cards_are_found_by_the_name_torch_reports(name, card):
    assert hwm.card_named(name) is (hwm.CARDS[card] if card else None)
    found = hwm.hardware_for(name, 5e14)
    assert (found is None) if card is None else (found.matmul_flops == 5e14 and "measured" in found.matmul_source)


def test_every_rate_has_a_source():
    for card in hwm.CARDS.values():
        assert card.matmul_source and card.source and card.matmul_flops < card.peak_bf16_flops
    terms = planner.predict(seven_b("zero3", offload=True, accumulation=2), "2023").time.terms
    assert all(t.source for t in terms) and {t.group for t in terms} == set(tm.GROUPS)


def test_clock():
    assert tm.clock(3130) == "0:52:10" and tm.clock(142399) == "39:33:19"


# Ten layers of SMALL's width: one layer has 4h^2 + 3hI + 2h = 64 + 96 + 8 = 168 parameters; its forward over
# 2 tokens is (2 x 160 + 4 h s) x 2 = 704 FLOPs: 0.704 s at 1000 FLOP/s (HBM made fast enough not to count).
TEN = dataclasses.replace(SMALL, layers=10)
# Fetch of a layer on 2 GPUs with offload: 2 x 168 / 2 = 168 bytes over half the PCIe link, then the ring's
# 2 x 168 x 1/2 = 168 bytes over NVLink: 0.176 s each at these rates, half the forward.
LEAD_HW = hwm.Hardware(dataclasses.replace(ROUND, hbm_bytes_per_s=1e30, nvlink_bytes_per_s=168 / 0.176,
                                           pcie_bytes_per_s=2 * 168 / 0.176), ROUND_HOST)


def ten(gpus=2, offload=True, micro_batch=1, method="zero3"):
    return mm.Workload(TEN, Parallelism(method, offload), gpus, micro_batch=micro_batch, seq_len=2, grad_ckpt=True,
                       accumulation=1, attention="sdpa")


def test_zero3_cpu_lead_is_the_layers_issued_before_the_gpu_reaches_them():
    assert tm.layer_forward_seconds(ten(), "today", LEAD_HW) == pytest.approx(0.704)
    assert tm.layer_fetch_seconds(ten(), LEAD_HW) == pytest.approx(0.352)
    # The CPU issues 10 layers in 3.52 s while the GPU finishes 5: 5 layers ahead, 2 x 168 bytes each.
    lead = tm.zero3_forward_lead(ten(), "today", LEAD_HW)
    assert lead.layers == pytest.approx(5)
    (term,) = mm.zero3_gathered_ahead_terms(ten(), lead)
    assert (term.kind, term.bytes) == ("reserve", 5 * 2 * 168)
    # Without offload only the all-gather holds the CPU: 0.176 s, 7.5 layers ahead; a batch 3 times larger
    # makes the forward 3 times longer: 10 (1 - 0.352 / 2.112) layers, at most 9.
    assert tm.zero3_forward_lead(ten(offload=False), "today", LEAD_HW).layers == pytest.approx(7.5)
    assert tm.zero3_forward_lead(ten(micro_batch=3), "today", LEAD_HW).layers == pytest.approx(10 * (1 - 1 / 6))
    assert tm.zero3_forward_lead(ten(micro_batch=100), "today", LEAD_HW).layers == 9
    # A fetch slower than the forward: the GPU waits for parameters and the CPU is not ahead.
    slow = dataclasses.replace(LEAD_HW, card=dataclasses.replace(LEAD_HW.card, pcie_bytes_per_s=1.0))
    assert tm.zero3_forward_lead(ten(), "today", slow).layers == 0
    assert mm.zero3_gathered_ahead_terms(ten(), tm.zero3_forward_lead(ten(), "today", slow)) == []
    # Nothing is gathered on one GPU with the parameters on it, nor by FSDP (FSDP2 holds references instead).
    assert tm.zero3_forward_lead(ten(gpus=1, offload=False), "today", LEAD_HW) is None
    assert tm.zero3_forward_lead(ten(method="fsdp"), "today", LEAD_HW) is None
    # One GPU with offload fetches its whole layer and waits for it (NoGatherHandle.wait): 2 x 168 bytes over
    # the whole PCIe link (alone on its switch), 0.176 s, and no all-gather: 10 (1 - 0.176 / 0.704) layers.
    assert tm.zero3_forward_lead(ten(gpus=1), "today", LEAD_HW).layers == pytest.approx(7.5)
