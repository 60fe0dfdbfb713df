"""The planner's time: the ranking of what fits, the CLI, and the calibration against the table's 21 time
cells (which rows it gets within 25%, recorded so that a change in either direction is noticed)."""

import json

import pytest

from conftest import ROOT
from shardkit import cli, planner
from shardkit.spec import reference

GIB = 2**30


def test_ranking_puts_what_costs_less_first():
    """With memory to spare, every configuration fits and the order is known: the same configuration without
    offload is faster than with it (no host copies, no CPU optimizer), without checkpointing faster than
    with it (no recomputation)."""
    found = planner.search("llama-7b", 8, gpu_memory=4096 * GIB)
    fitting, faster = planner.ranked(found)
    assert len(fitting) == len(found) and faster == []
    times = [p.time.run_seconds for p in fitting]
    assert times == sorted(times)
    position = {(p.workload.method, p.workload.offload, p.workload.grad_ckpt, p.workload.micro_batch): i
                for i, p in enumerate(fitting)}
    for (method, offload, ckpt, batch), i in position.items():
        if offload:
            assert position[(method, False, ckpt, batch)] < i
        if ckpt:
            assert position[(method, offload, False, batch)] < i
    assert not fitting[0].workload.offload and not fitting[0].workload.grad_ckpt


def test_faster_configurations_that_do_not_fit_say_why():
    found = planner.search("llama-13b", 4, gpu_memory=80 * GIB, host_memory=100 * GIB)
    fitting, faster = planner.ranked(found)
    assert fitting and all(p.rejected is None for p in fitting)
    assert all(p.time.run_seconds < fitting[0].time.run_seconds for p in faster)
    assert {p.rejected.split(":")[0] for p in faster} == {"OOM on GPU"}
    # 100 GiB of host memory holds no offloaded 13B: every offload configuration that fits its GPU is rejected
    # on the host.
    offloaded = [p for p in found if p.workload.offload and p.verdict != "oom"]
    assert offloaded and all(p.rejected.startswith("OOM on host: ") for p in offloaded)
    text = planner.render_search(found, "llama-13b", 4, 80 * GIB, "today")
    assert "fastest predicted full run first" in text and "Faster, but rejected:" in text
    assert "OOM on GPU: live" in text


def test_cli_plan_shows_time_for_a_recipe(capsys):
    assert cli.main(["plan", "llama-7b_fsdp_8gpu_bs1", "--stack", "2023"]) == 0
    out = capsys.readouterr().out
    assert "time on A100 SXM 80GB" in out and "full run 0:" in out and "dominant: compute" in out
    assert cli.main(["plan", "llama-65b_zero3-offload_8gpu_bs1", "--stack", "2023", "--json", "--gpu", "h100",
                     "--link", "pcie"]) == 0
    time = json.loads(capsys.readouterr().out)["time"]
    assert time["card"] == "H100 SXM 80GB" and time["link"] == "pcie" and time["dominant"] == "CPU optimizer"
    assert time["run_seconds"] == pytest.approx(time["steps"] * time["step_seconds"] + time["saves"]
                                                * time["save_seconds"] + time["startup_seconds"])


def test_cli_ranks_configurations_and_json_carries_rank_and_rejections(capsys):
    assert cli.main(["plan", "--model", "llama-7b", "--gpus", "2", "--gpu-mem", "40GB", "--json"]) == 0
    documents = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ranks = [d["rank"] for d in documents if "rank" in d]
    assert ranks == list(range(1, len(ranks) + 1))
    rejected = [d for d in documents if "rejected" in d]
    assert rejected and all(d["rejected"].startswith("OOM on GPU") for d in rejected)
    # Every configuration considered, each with its three figures and its verdict.
    assert len(documents) == len(planner.search("llama-7b", 2, 40 * 2**30))
    assert all(d["gpu_allocated_bytes"] <= d["gpu_reserved_bytes"] <= d["gpu_nvidia_smi_bytes"] and d["verdict"]
               for d in documents)
    methods = {(d["workload"]["kind"], d["workload"]["offload"], d["workload"]["grad_ckpt"]) for d in documents}
    assert len(methods) == 8 and {d["workload"]["accumulation"] for d in documents}


TABLE = reference.load_table()
CALIBRATION = {row["recipe"]: row for row in planner.calibration()}
RAN = [name for name, row in TABLE.items() if row.status == "ok"]
# The rows whose time the planner misses by more than 25% (docs/planner.md, "Time: where it misses", explains
# each with its arithmetic). Strict: a change that brings one within 25%, or pushes another out, fails here.
TIME_MISSES = {
    "llama-7b_fsdp_2gpu_bs1", "llama-7b_fsdp-offload_2gpu_bs1", "llama-7b_fsdp_4gpu_bs1", "llama-7b_fsdp_8gpu_bs1",
    "llama-7b_fsdp_8gpu_bs4", "llama-13b_fsdp_4gpu_bs1", "llama-13b_fsdp-offload_4gpu_bs1",
    "llama-13b_zero3-offload_4gpu_bs1", "llama-13b_fsdp_8gpu_bs1", "llama-30b_zero3-offload_4gpu_bs1",
    "llama-30b_zero3-offload_4gpu_bs4", "llama-30b_zero3-offload_4gpu_bs6", "llama-30b_zero3-offload_4gpu_bs8",
    "llama-30b_fsdp-offload_8gpu_bs1", "llama-30b_zero3-offload_8gpu_bs1"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="time missed by more than 25%: docs/planner.md"))
    if n in TIME_MISSES else n for n in RAN])
def test_time_within_25_percent(name):
    row = CALIBRATION[name]
    assert abs(row["time_residual"]) <= 0.25, row


def test_every_row_that_ran_has_a_predicted_time(capsys):
    assert len(RAN) == 21
    assert cli.main(["plan", "--calibration", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    timed = [r for r in rows if r["table_time_s"] is not None]
    assert len(timed) == 21 and all(r["predicted_time_s"] > 0 and r["time_residual"] is not None for r in timed)
    assert sum(r["time_within_25pct"] for r in timed) == 21 - len(TIME_MISSES)


def test_docs_show_the_current_time_calibration():
    doc = (ROOT / "docs" / "planner.md").read_text()
    assert planner.time_calibration_markdown(planner.calibration()) in doc, "regenerate: shardkit plan --calibration"


def test_calibration_figures(tmp_path):
    rows = planner.calibration()
    planner.time_calibration_figure(rows, tmp_path / "time.png")
    assert (tmp_path / "time.png").stat().st_size > 10_000


def test_readme_shows_the_commands_real_output(capsys):
    command = ["plan", "--model", "meta-llama/Llama-3.1-8B", "--gpus", "8", "--gpu", "h100", "--seq-len", "8192"]
    readme = (ROOT / "README.md").read_text()
    assert f"$ shardkit {' '.join(command)}" in readme
    assert cli.main(command) == 0
    assert capsys.readouterr().out.strip() in readme, "paste the command's output into README.md again"


def test_a_card_sets_the_memory_planned_against_and_a_contradicting_gpu_mem_is_named(capsys):
    assert cli.main(["plan", "--model", "llama-7b", "--gpus", "2", "--gpu", "L40S"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("llama-7b on 2 x 48 GiB (L40S 48GB, collectives over pcie)") and err == ""
    assert cli.main(["plan", "--model", "llama-7b", "--gpus", "2", "--gpu", "a100", "--gpu-mem", "40GB"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("llama-7b on 2 x 40 GiB (A100 SXM 80GB")
    assert err.strip() == ("shardkit: planning against --gpu-mem 40 GiB, not the A100 SXM 80GB's 80 GiB; times are "
                           "the A100 SXM 80GB's")


def test_an_unknown_card_is_one_line_listing_the_known_ones(capsys):
    assert cli.main(["plan", "--model", "llama-7b", "--gpus", "2", "--gpu", "v100"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gpu 'v100': not a card the planner knows; known: a100-sxm-80gb" in err
    assert "rtx-6000-ada" in err and "l40s" in err


@pytest.mark.parametrize("written", ["h100-pcie", "H100 PCIe", "nvidia-h100-pcie", "H100_PCIE"])
def test_cards_are_named_forgivingly(written):
    assert planner.card_for(written).name == "H100 PCIe 80GB"
