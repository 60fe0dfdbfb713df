"""Verdicts for every kind of case. The tiny rows use real CPU runs; the table-row cases start from a real
result too, with GPU figures written in (a CPU cannot produce them): which figures, is said in each test."""

import copy
import json
import subprocess
import sys

import pytest

from conftest import ROOT, cpu_env
from shardkit import planner
from shardkit.errors import UsageError
from shardkit.planner.time_model import clock
from shardkit.spec import recipes
from shardkit.spec.reference import BYTES_PER_TABLE_GB, load_table, load_tiny
from shardkit.verdict import diff, report

H100 = "NVIDIA H100 80GB HBM3"
H100_OVER_A100 = 989.4 / 312.0


@pytest.fixture(scope="module")
def real_result(tmp_path_factory, request):
    """A real run of the tiny FSDP recipe on 2 CPU ranks: run now in the full tier, else the committed one
    (tests/data/tiny_fsdp_2cpu_bs4, written by `shardkit run tiny_fsdp_2cpu_bs4` on the CPU machine)."""
    if not request.config.getoption("--full"):
        folder = ROOT / "tests" / "data" / "tiny_fsdp_2cpu_bs4"
        return folder, json.loads((folder / "results.json").read_text())
    root = tmp_path_factory.mktemp("diff")
    done = subprocess.run([sys.executable, "-m", "shardkit", "run", "tiny_fsdp_2cpu_bs4", "--results", str(root)],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    folder = root / "full" / "tiny_fsdp_2cpu_bs4"
    return folder, json.loads((folder / "results.json").read_text())


def as_table_row(result, recipe, *, memory_gb=None, hours=None, status="ok", gpu=H100, probe=False):
    """The real result, renamed to a table row, with GPU memory (table GB) and a full run's wall time
    written in."""
    doc = copy.deepcopy(result)
    doc["run"]["name"] = recipe
    doc["run"]["probe"] = probe
    doc["status"] = status
    doc["environment"]["gpu"] = {"name": gpu} if gpu else None
    if memory_gb is not None:
        doc["memory"]["max_over_ranks"]["gpu_nvml_used_peak_bytes"] = memory_gb * BYTES_PER_TABLE_GB
    if hours is not None:
        doc["time"]["wall_time_s"] = hours * 3600
    if status != "ok":
        doc["failure"] = {"kind": status, "rank": 1, "step": 3, "message": f"{status} for the test"}
    return doc


DEFAULT_TOLERANCES = diff.Tolerances()


def judge(doc, tol=DEFAULT_TOLERANCES):
    name = doc["run"]["name"]
    return diff.compare([name], {name: doc}, load_table(), load_tiny(), tol)[0]


ROW = "llama-7b_fsdp_8gpu_bs4"  # reference: 56GB, 0:38:00
OOM_ROW = "llama-30b_fsdp_8gpu_bs1"


def test_reproduced_within_tolerance_after_normalization(real_result):
    _, result = real_result
    # 38 min on an A100 corresponds to 38 / 3.17 min on an H100 (datasheet ratio); 5% over on both.
    v = judge(as_table_row(result, ROW, memory_gb=56 * 1.05, hours=38 / 60 / H100_OVER_A100 * 1.05))
    assert v.verdict == "reproduced", v.reason
    assert v.measured["normalization_factor"] == pytest.approx(H100_OVER_A100)
    assert v.measured["time_s_normalized"] == pytest.approx(38 * 60 * 1.05)
    assert v.measured["ratios"] == pytest.approx({"memory": 1.05, "time": 1.05})


def test_better_and_worse_with_ratios(real_result):
    _, result = real_result
    better = judge(as_table_row(result, ROW, memory_gb=28, hours=38 / 60 / H100_OVER_A100))
    assert better.verdict == "better" and "memory x0.50" in better.reason
    worse = judge(as_table_row(result, ROW, memory_gb=28, hours=1.5 * 38 / 60 / H100_OVER_A100))
    assert worse.verdict == "worse" and "time x1.50" in worse.reason and "memory x0.50" in worse.reason


def test_tolerances_are_explicit_and_overridable(real_result):
    _, result = real_result
    doc = as_table_row(result, ROW, memory_gb=56 * 1.15, hours=38 / 60 / H100_OVER_A100)
    assert judge(doc).verdict == "worse"
    assert judge(doc, diff.Tolerances(memory_rel=0.2)).verdict == "reproduced"


def test_out_of_memory_cases(real_result):
    _, result = real_result
    assert judge(as_table_row(result, OOM_ROW, status="oom")).verdict == "oom-as-reference"
    fits = judge(as_table_row(result, OOM_ROW, memory_gb=79, hours=20))
    assert fits.verdict == "fits-where-reference-oom"
    lost = judge(as_table_row(result, ROW, status="oom"))
    assert lost.verdict == "oom-where-reference-fit" and "rank 1, step 3" in lost.reason


def test_error_and_not_run(real_result):
    _, result = real_result
    failed = judge(as_table_row(result, ROW, status="error"))
    assert failed.verdict == "error" and "error for the test" in failed.reason
    missing = diff.compare([ROW], {}, load_table(), load_tiny(), diff.Tolerances(),
                           {ROW: "needs 8 GPUs, 0 visible"})[0]
    assert missing.verdict == "not-run" and missing.reason.startswith("needs 8 GPUs, 0 visible; time not measured")


def test_rows_without_a_measured_time_show_the_planners_and_say_so(real_result):
    _, result = real_result
    missing = diff.compare([ROW], {}, load_table(), load_tiny(), diff.Tolerances(), {ROW: "not run"})[0]
    planned = planner.predict_recipe(recipes.load_recipe(ROW), "today").time.run_seconds
    assert missing.predicted["time_s"] == pytest.approx(planned) and missing.measured["time_basis"] == "predicted"
    assert f"the planner predicts {clock(planned)} on A100 SXM 80GB (today stack; table 0:38:00" in missing.reason
    assert report.rows([missing])[0]["predicted_time_s"] == f"{planned:.0f}"
    measured = judge(as_table_row(result, ROW, memory_gb=56, hours=38 / 60 / H100_OVER_A100))
    assert "time" in measured.measured["ratios"] and "time not measured" not in measured.reason
    fake = as_table_row(result, ROW, memory_gb=56, hours=100)
    fake["run"]["fake_world"] = 8
    assert "time not measured: the planner predicts" in judge(fake).reason


def test_unknown_gpu_uses_its_measured_rate_and_no_gpu_is_not_normalized(real_result):
    _, result = real_result
    doc = as_table_row(result, ROW, memory_gb=56, hours=38 / 60, gpu="NVIDIA Future GPU")
    doc["environment"]["matmul_bf16_flops"] = 624e12
    v = judge(doc)
    assert v.measured["normalization_factor"] == pytest.approx(2.0) and "measured" in v.measured["normalization"]
    raw = judge(as_table_row(result, ROW, memory_gb=56, hours=38 / 60, gpu=None))
    assert raw.measured["normalization_factor"] is None and raw.verdict == "reproduced"


def test_probe_compares_its_projection(real_result):
    _, result = real_result
    assert result["run"]["probe"] is True  # the tiny recipe stops at MAX_STEPS
    doc = as_table_row(result, ROW, memory_gb=56, probe=True)
    doc["time"]["projected_full_run"]["wall_time_s"] = 38 * 60 / H100_OVER_A100
    v = judge(doc)
    assert v.measured["time_basis"] == "projected" and v.verdict == "reproduced"


def test_tiny_rows_compare_loss_curves(real_result):
    _, result = real_result
    same = judge(result)
    assert same.verdict == "reproduced", same.reason
    shifted = copy.deepcopy(result)
    shifted["loss"][2] += 0.01
    off = judge(shifted)
    assert off.verdict == "mismatch" and "at step 3" in off.reason


def test_rows_at_capacity_are_not_judged_better_on_memory(real_result):
    _, result = real_result
    # llama-13b_fsdp_8gpu_bs1 printed 78GB: the card was full. 40 GB measured, same normalized time.
    v = judge(as_table_row(result, "llama-13b_fsdp_8gpu_bs1", memory_gb=40, hours=81 / 60 / H100_OVER_A100))
    assert v.verdict == "reproduced" and "at capacity" in v.reason
    assert v.measured["ratios"]["memory"] == pytest.approx(40 / 78)
    # Below capacity (56GB) the same ratio is "better".
    assert judge(as_table_row(result, ROW, memory_gb=28, hours=38 / 60 / H100_OVER_A100)).verdict == "better"


def test_fake_world_results_compare_memory_only(real_result):
    _, result = real_result
    doc = as_table_row(result, ROW, memory_gb=56, hours=100)  # a fake world's time means nothing
    doc["run"]["fake_world"] = 8
    v = judge(doc)
    assert v.verdict == "reproduced" and "time" not in v.measured["ratios"] and "fake world of 8" in v.reason


def test_every_table_verdict_carries_the_planners_figure(real_result):
    _, result = real_result
    v = judge(as_table_row(result, ROW, memory_gb=56, hours=38 / 60 / H100_OVER_A100))
    # The real CPU result ran torch 2.13: today's stack, on the table's card (no GPU memory in a CPU result).
    assert v.predicted["stack"] == "today" and v.predicted["verdict"] == "fits" and v.predicted["memory_gb"] > 0
    old = as_table_row(result, OOM_ROW, status="oom")
    old["environment"]["versions"]["torch"] = "2.0.1"
    assert judge(old).predicted == {**judge(old).predicted, "stack": "2023", "verdict": "oom", "memory_gb": None}
    assert report.rows([v])[0]["predicted_memory_gb"].endswith("(today)")
    assert report.rows([v])[0]["stack"] == "today"


def test_a_2023_emulated_run_is_compared_with_the_2023_prediction(real_result):
    _, result = real_result
    emulated = as_table_row(result, ROW, memory_gb=56, hours=38 / 60 / H100_OVER_A100)
    emulated["run"]["stack"] = "2023-emulated"  # what --stack 2023 writes (schema 3), on today's torch
    v = judge(emulated)
    assert v.predicted["stack"] == "2023" and v.measured["stack"] == "2023-emulated"
    assert report.rows([v])[0]["stack"] == "2023-emulated"
    assert report.rows([v])[0]["predicted_memory_gb"].endswith("(2023)")


def test_exit_codes_and_strict():
    verdicts = [diff.Verdict("a", "reproduced", ""), diff.Verdict("b", "better", ""), diff.Verdict("c", "not-run", "")]
    assert diff.exit_code(verdicts, strict=False) == 0
    assert diff.exit_code(verdicts, strict=True) == 1
    for failing in ("worse", "oom-where-reference-fit", "error", "mismatch"):
        assert diff.exit_code([diff.Verdict("x", failing, "")], strict=False) == 1


def test_report_rows_markdown_csv_and_figures(real_result, tmp_path):
    _, result = real_result
    verdicts = [judge(as_table_row(result, ROW, memory_gb=28, hours=0.1)),
                judge(as_table_row(result, OOM_ROW, status="oom")), judge(result)]
    paths = report.write(verdicts, tmp_path)
    markdown, csv_text = paths["markdown"].read_text(), paths["csv"].read_text()
    assert markdown.count("\n") == 2 + 3 and csv_text.count("\n") == 1 + 3
    for row in report.rows(verdicts):
        assert row["verdict"] in markdown and f"{row['recipe']},{row['verdict']}" in csv_text
    assert "| 56GB |" in markdown
    assert paths["png"].stat().st_size > 10_000 and paths["loss_png"].stat().st_size > 10_000


def test_cli_diff_json_and_exit_code(real_result, tmp_path):
    folder, result = real_result
    worse = tmp_path / "worse.json"
    worse.write_text(json.dumps(as_table_row(result, ROW, memory_gb=70, hours=1)))
    done = subprocess.run([sys.executable, "-m", "shardkit", "diff", str(folder), str(worse), "--json",
                           "--report", str(tmp_path / "report")],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    printed = json.loads(done.stdout)
    assert printed == json.loads((tmp_path / "report" / "verdicts.json").read_text())  # one shape for both
    verdicts = {v["recipe"]: v["verdict"] for v in printed["verdicts"]}
    assert verdicts == {"tiny_fsdp_2cpu_bs4": "reproduced", ROW: "worse"}
    relaxed = subprocess.run([sys.executable, "-m", "shardkit", "diff", str(worse), "--memory-tol", "1",
                              "--time-tol", "5"], cwd=ROOT, env=cpu_env(), capture_output=True, text=True)
    assert relaxed.returncode == 0 and "reproduced" in relaxed.stdout


def test_results_of_an_unknown_schema_version_are_refused(real_result, tmp_path):
    _, result = real_result
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**result, "schema_version": 99}))
    with pytest.raises(UsageError, match="schema_version 99"):
        diff.load_results([future])
    old = tmp_path / "v1.json"
    old.write_text(json.dumps({**result, "schema_version": 1}))
    assert list(diff.load_results([old])) == ["tiny_fsdp_2cpu_bs4"]


def test_diff_searches_folders_and_defaults_to_the_results_root(real_result, tmp_path, monkeypatch, capsys):
    from shardkit import cli

    _, result = real_result
    smoke = tmp_path / "results" / "smoke" / "full" / "tiny_fsdp_2cpu_bs4"  # where `shardkit smoke` puts a row
    smoke.mkdir(parents=True)
    (smoke / "results.json").write_text(json.dumps(result))
    (tmp_path / "results" / "smoke" / "verdicts.json").write_text("{}")  # a report beside it is not a result
    monkeypatch.chdir(tmp_path)
    assert cli.main(["diff", "results/smoke", "--json"]) == 0
    assert [v["recipe"] for v in json.loads(capsys.readouterr().out)["verdicts"]] == ["tiny_fsdp_2cpu_bs4"]
    assert cli.main(["diff", "--json"]) == 0  # no path: everything under results/
    assert [v["verdict"] for v in json.loads(capsys.readouterr().out)["verdicts"]] == ["reproduced"]
    # A second result for the same recipe (a probe beside the full run) is refused, not silently chosen.
    probe = tmp_path / "results" / "probe5" / "tiny_fsdp_2cpu_bs4"
    probe.mkdir(parents=True)
    (probe / "results.json").write_text(json.dumps(result))
    assert cli.main(["diff"]) == 2
    assert "a second result for tiny_fsdp_2cpu_bs4" in capsys.readouterr().err
    assert cli.main(["diff", "results/probe5"]) == 0


def test_one_diff_holds_a_rows_runs_on_every_stack_and_refuses_two_on_one(tmp_path, real_result):
    """A row run today and in the period image: two verdicts, each named with its stack and compared with
    the planner's figures for that stack; a second result on the same stack is still refused. (The period
    result is the real CPU run relabelled by its torch version: no period run trains on CPU.)"""
    base = as_table_row(real_result[1], ROW, memory_gb=40, hours=0.8)
    period = copy.deepcopy(base)
    period["environment"]["versions"]["torch"] = "2.0.1"
    for folder, document in (("full", base), ("full-period", period), ("copy", period)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps(document))
    found = diff.load_results([tmp_path / "full", tmp_path / "full-period"])
    assert set(found) == {ROW, f"{ROW}@period"}
    verdicts = {v.recipe: v for v in diff.compare(list(found), found, load_table(), load_tiny(), diff.Tolerances())}
    assert set(verdicts) == {ROW, f"{ROW}@period"}
    assert verdicts[ROW].predicted["stack"] == "today" and verdicts[f"{ROW}@period"].predicted["stack"] == "2023"
    with pytest.raises(UsageError, match=f"a second result for {ROW}@period"):
        diff.load_results([tmp_path / "full-period", tmp_path / "copy"])


def test_the_diff_predicts_with_the_allocator_a_run_used():
    from shardkit.verdict.diff import allocator_of

    assert allocator_of({"allocator_conf": "expandable_segments:True"}) == "expandable"
    assert allocator_of({"allocator_conf": "max_split_size_mb:128,expandable_segments:True"}) == "expandable"
    assert allocator_of({"allocator_conf": "expandable_segments:False"}) == "default"
    assert allocator_of({}) == "default"  # older results, and the 2023 stack's


def test_expandable_segments_leave_no_fragmentation_uncertainty_and_keep_the_stream_pools():
    from shardkit import planner
    from shardkit.spec import recipes

    recipe = recipes.load_recipe("llama-3.1-8b_fsdp_8gpu_bs1")
    default = planner.predict_recipe(recipe, "today", allocator="default")
    expandable = planner.predict_recipe(recipe, "today", allocator="expandable")
    assert default.reserve_uncertainty > 0 and expandable.reserve_uncertainty == 0
    assert expandable.reserved == default.reserved > expandable.allocated == default.allocated


def _markdown_columns(markdown: str) -> list[list[str]]:
    """Each column's cells, header first; the "| --- |" rule is left out."""
    lines = [line.strip("|").split(" | ") for line in markdown.splitlines()
             if line.startswith("| ") and not line.startswith("| --- ")]
    return [[cell.strip() for cell in cells] for cells in zip(*lines, strict=True)]


def test_the_markdown_report_shows_no_column_that_every_row_leaves_empty(real_result):
    _, result = real_result
    tiny = report.markdown(report.rows([judge(result)]))
    columns = _markdown_columns(tiny)
    assert [column[0] for column in columns][:2] == ["recipe", "verdict"]
    assert all(any(column[1:]) for column in columns), tiny
    assert "reference_memory" not in tiny and len(columns) < len(report.COLUMNS)
    # A table row beside it brings its reference columns back, empty only in the tiny row's cells.
    mixed = report.markdown(report.rows([judge(as_table_row(result, ROW, memory_gb=28, hours=0.1)), judge(result)]))
    assert "reference_memory" in mixed and "reference_time_s" in mixed
    assert all(any(column[1:]) for column in _markdown_columns(mixed))
