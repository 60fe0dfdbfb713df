"""benchmarks/gpu_acceptance.sh, the one call a GPU machine gets: its harness (deadlines, cut-short stages, the
report rewritten as it grows), and a rehearsal of every stage on CPU so that it cannot break before a GPU is
at hand."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import ROOT, cpu_env

spec = importlib.util.spec_from_file_location("acceptance", ROOT / "benchmarks" / "acceptance.py")
acceptance = importlib.util.module_from_spec(spec)
sys.modules["acceptance"] = acceptance  # dataclasses look their module up there
spec.loader.exec_module(acceptance)


def context(tmp_path, limit_s, stages):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    (work / "runs").mkdir(parents=True)
    report = acceptance.new_report(stages, rehearsal=True, limit_s=limit_s)
    return acceptance.Context(True, out, work, time.monotonic() + limit_s, report)


def test_a_run_past_its_deadline_is_killed_with_its_detached_children(tmp_path):
    # A launcher whose worker sits in a session of its own, as torchrun starts ranks.
    pid_file = tmp_path / "worker.pid"
    launcher = ("import subprocess, sys, time; "
                "w = subprocess.Popen(['sleep', '120'], start_new_session=True); "
                f"open({str(pid_file)!r}, 'w').write(str(w.pid)); time.sleep(120)")
    ctx = context(tmp_path, 60, [])
    stage = {"name": "test"}
    runs = [acceptance.Run("slow", ["-c", launcher], tmp_path / "slow"),
            acceptance.Run("never", ["-c", "pass"], tmp_path / "never")]
    started = time.monotonic()
    slow, never = acceptance.run_all(ctx, stage, runs, deadline=time.monotonic() + 4, jobs=1)
    assert time.monotonic() - started < 30
    assert (slow["status"], slow["cut_short"], never["status"]) == ("cut short", True, "not run")
    assert stage["cut_short"] is True
    worker = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)


def test_each_stage_is_recorded_as_it_ended_and_the_report_is_written_after_each(tmp_path):
    def broken(ctx, stage, deadline):
        raise RuntimeError("broken stage")

    def slow(ctx, stage, deadline):
        acceptance.run_all(ctx, stage, [acceptance.Run("sleeper", ["-c", "import time; time.sleep(60)"],
                                                       ctx.work / "runs" / "sleeper")], deadline)

    def never(ctx, stage, deadline):
        raise AssertionError("a stage past the overall deadline must not start")

    stages = [acceptance.Stage("environment", "First", (30, 30), 0, broken),
              acceptance.Stage("gpu_tests", "Second", (30, 30), 0, slow),
              acceptance.Stage("tiny", "Third", (30, 30), 0, never)]
    ctx = context(tmp_path, 6, stages)
    acceptance.run_stages(ctx, stages)
    report = json.loads((ctx.out / "report.json").read_text())
    statuses = [s["status"] for s in report["stages"]]
    assert statuses == ["failed", "cut short", "not started: the overall deadline came first"]
    assert "RuntimeError: broken stage" in report["stages"][0]["error"]
    markdown = (ctx.out / "report.md").read_text()
    assert "| First | failed |" in markdown and "| Second | cut short |" in markdown
    with tarfile.open(ctx.out / "runs.tgz") as tar:
        assert "runs/sleeper/sleeper.log" in tar.getnames()


def test_the_engines_stage_sets_the_planners_step_time_beside_the_measured_one():
    import dataclasses

    from shardkit import planner
    from shardkit.spec.parallelism import Parallelism

    w = planner.workload("llama-7b", Parallelism("fsdp", False), 1, 4, True, 1, "eager", 2048)
    w = dataclasses.replace(w, shape=dataclasses.replace(w.shape, layers=8))
    on_h100 = {"environment": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}, "matmul_bf16_flops": 7.0e14}}
    expected = planner.predict(w, "today", hardware=planner.Hardware(planner.CARDS["h100"],
                                                                     measured_matmul_flops=7.0e14))
    assert acceptance._predicted_step(w, on_h100) == pytest.approx(expected.time.step_seconds)
    assert acceptance._predicted_step(w, {"environment": {"gpu": None}}) is None  # CPU: no card, no prediction
    stage = {"shape": {}, "ratios": [], "rows": [{
        "name": "fsdp.native", "status": "ok", "s_per_step": 0.3, "predicted_s_per_step": 0.25, "step_error": 0.2,
        "tokens_per_s": 1.0, "model_flops_per_s": None, "mfu": None, "hfu": None, "of_matmul": None,
        "predicted_live": None, "allocated": None, "reserved": None, "nvml": None, "checks": {}}]}
    table = "\n".join(acceptance._render_engines(stage))
    assert "| planner s/step | error |" in table and "| 0.300 | 0.250 | +20.0% |" in table


@pytest.mark.slow
def test_rehearsal_runs_every_stage_on_cpu_and_writes_a_report_that_parses(tmp_path):
    out = tmp_path / "out"
    env = {**cpu_env(), "GPU_ACCEPTANCE_REHEARSAL": "1", "OUT": str(out), "PYTHON": sys.executable,
           "GPU_ACCEPTANCE_WORK": str(tmp_path / "work")}
    env.pop("GPU_ACCEPTANCE_STAGES", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_acceptance.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]

    # What a GPU machine sends back: at most 8 plain files under 16 MiB with plain names.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["acceptance.log", "report.json", "report.md", "runs.tgz"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) and (out / name).stat().st_size < 16 * 2**20 for name in files)

    report = json.loads((out / "report.json").read_text())
    assert report["rehearsal"] is True
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["environment", "gpu_tests", "tiny", "oom", "replays", "engines", "zero3_lead",
                            "replays_2023"]
    assert {name: s["status"] for name, s in stages.items()} == dict.fromkeys(stages, "done")
    assert all(row["ok"] for s in stages.values() for row in s["rows"])

    probe = stages["environment"]["probe"]
    assert probe["device"] == "cpu" and probe["versions"]["torch"] and probe["versions"]["deepspeed"]

    tests = stages["gpu_tests"]["rows"]
    assert len(tests) >= 3 and {t["outcome"] for t in tests} == {"skipped"}

    tiny = {(r["method"], r["engine"]): r for r in stages["tiny"]["rows"]}
    assert set(tiny) == {("fsdp", "native"), ("fsdp_offload", "native"), ("zero3", "native"),
                         ("zero3_offload", "native"), ("zero3", "hf"), ("zero3_offload", "hf")}
    assert all(r["status"] == "ok" and r["exit_code"] == 0 and r["host_rss"] > 0 for r in tiny.values())
    tiny_results = stages["tiny"]["results"]
    assert tiny_results["tiny_fsdp_2cpu_bs4.native"]["run"]["fake_world"] == 2
    assert tiny_results["tiny_zero3_2cpu_bs4.hf"]["run"]["engine"] == "hf"

    (oom,) = stages["oom"]["rows"]
    assert (oom["status"], oom["exit_code"], oom["failure_device"]) == ("oom", 3, "cpu")
    assert oom["bytes_requested"] == oom["bytes_asked"] == 64 * 32 * 2048 * 2048 * 4

    replays = {r["name"]: r for r in stages["replays"]["rows"]}
    # The rows a GPU would replay, picked and predicted; the 30B row the planner says fits 80 GiB just.
    assert "llama-30b_fsdp_8gpu_bs1" in replays and "llama-7b_fsdp_8gpu_bs1" in replays
    assert all(r["predicted_allocator"] > 0 for r in replays.values())
    assert "llama-30b_fsdp_4gpu_bs1" in {r["name"] for r in stages["replays"]["left_out"]}
    stand_in = replays["tiny_fsdp_2cpu_bs4"]
    assert stand_in["status"] == "ok" and stand_in["fake_world"] == 2
    assert any("no allocator history was written" in note for note in stages["replays"]["notes"])
    replayed = stages["replays"]["results"]["tiny_fsdp_2cpu_bs4"]
    assert replayed["run"]["fake_world"] == 2 and replayed["environment"]["gpu_memory_cap_bytes"] is None

    old = stages["replays_2023"]
    considered = {r["name"] for r in old["rows"]} | {r["name"] for r in old["left_out"]}
    assert {"llama-7b_fsdp_8gpu_bs1", "llama-13b_fsdp_4gpu_bs1"} <= considered
    assert "llama-30b_fsdp_8gpu_bs1" in {r["name"] for r in old["left_out"]}  # the 2023 stack: OOM, as the table
    assert all(r["table"] for r in old["rows"] if r["name"] != "tiny_fsdp_2cpu_bs4")
    replayed_2023 = old["results"]["tiny_fsdp_2cpu_bs4"]
    assert replayed_2023["status"] == "ok" and replayed_2023["run"]["stack"] == "2023-emulated"
    assert replayed_2023["run"]["gradient_accumulation_steps"] == 2  # kept: the no_sync gradients need it

    engines = {r["name"]: r for r in stages["engines"]["rows"]}
    assert engines["fsdp.hf"]["exit_code"] == 2  # HF Trainer would run DDP on CPU: refused
    for name in ("fsdp.native", "zero3.native", "zero3.hf"):
        assert engines[name]["status"] == "ok" and engines[name]["tokens_per_s"] > 0
    assert [r["method"] for r in stages["engines"]["ratios"]] == ["zero3"]
    assert all(r["predicted_s_per_step"] is None for r in engines.values())  # no card on CPU: not predicted

    leads = stages["zero3_lead"]["rows"]
    assert [r["micro_batch"] for r in leads] == [1, 4]
    assert all(r["status"] == "ok" and r["predicted_layers"] is None for r in leads)  # no card on CPU: not predicted
    assert stages["zero3_lead"]["results"]["zero3_offload.bs4"]["run"]["offload"] is True

    markdown = (out / "report.md").read_text()
    for s in stages.values():
        assert f"## {s['title']}" in markdown
    assert done.stdout.rstrip().endswith(markdown.rstrip().splitlines()[-1])  # printed at the end
    with tarfile.open(out / "runs.tgz") as tar:
        assert sum(name.endswith("/results.json") for name in tar.getnames()) == 6 + 1 + 1 + 3 + 1 + 2
