"""`shardkit reproduce`: rows in their own processes, failures contained, resume without redoing work."""

import json
import resource
import shutil
import subprocess
import sys

import pytest

from conftest import RECIPES, ROOT, cpu_env

pytestmark = pytest.mark.slow

FAST = "MODEL=tiny\nMETHOD=fsdp\nGPUS=2\nBATCH=4\nGRAD_CKPT=False\nGRAD_ACCUM=1\nBF16=False\nMAX_STEPS=2\nNUM_EXAMPLES=64\nSAVE=False\n"
# 16 sequences of 8192 tokens: eager attention scores of 16 x 4 x 8192^2 x 4 bytes = 17 GB, past the cap below.
OOM = FAST.replace("BATCH=4", "BATCH=16").replace("NUM_EXAMPLES=64", "NUM_EXAMPLES=64\nSEQ_LEN=8192")


@pytest.fixture
def recipe_dir(tmp_path):
    folder = tmp_path / "recipes"
    (folder / "configs").mkdir(parents=True)
    shutil.copy(RECIPES / "reference.csv", folder)
    (folder / "tiny_ok.env").write_text(FAST)
    (folder / "tiny_oom.env").write_text(OOM)
    return folder


def _cap_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (12 * 2**30, 12 * 2**30))


def reproduce(recipe_dir, results, *args):
    return subprocess.run([sys.executable, "-m", "shardkit", "reproduce", *args, "--results", str(results)],
                          cwd=ROOT, env=cpu_env(SHARDKIT_RECIPES=str(recipe_dir)), capture_output=True, text=True,
                          timeout=900, preexec_fn=_cap_address_space)


def status(results, name):
    return json.loads((results / "full" / name / "results.json").read_text())["status"]


def test_failed_row_does_not_stop_the_campaign_and_resume_skips_finished_rows(recipe_dir, tmp_path):
    results = tmp_path / "results"
    first = reproduce(recipe_dir, results, "tiny_oom", "tiny_ok")
    assert status(results, "tiny_oom") == "oom", first.stderr[-3000:]
    assert status(results, "tiny_ok") == "ok", first.stderr[-3000:]
    assert (results / "full" / "tiny_ok" / "train.log").read_text().count("step 2/2") == 1
    ok_results = results / "full" / "tiny_ok" / "results.json"
    stamp = ok_results.stat().st_mtime_ns

    again = reproduce(recipe_dir, results, "tiny_oom", "tiny_ok")
    assert again.stderr.count("finished earlier, kept") == 2
    assert ok_results.stat().st_mtime_ns == stamp

    ok_results.unlink()  # a row interrupted before its results were written
    third = reproduce(recipe_dir, results, "tiny_oom", "tiny_ok")
    assert third.stderr.count("finished earlier, kept") == 1 and status(results, "tiny_ok") == "ok"

    forced = reproduce(recipe_dir, results, "tiny_ok", "--force")
    assert "finished earlier" not in forced.stderr and ok_results.stat().st_mtime_ns != stamp


def test_rows_needing_more_gpus_are_not_run(tmp_path):
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "shardkit", "reproduce", "llama-7b_fsdp_8gpu_bs4",
                           "llama-65b_zero3-offload_8gpu_bs4", "--results", str(results), "--json"],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    verdicts = json.loads(done.stdout)["verdicts"]
    assert [v["verdict"] for v in verdicts] == ["not-run"] * 2
    for v in verdicts:  # the reason first, then the planner's time in place of the missing measurement
        assert v["reason"].startswith("needs 8 GPUs, 0 visible; time not measured: the planner predicts"), v["reason"]
    assert (results / "full" / "report.md").is_file() and (results / "full" / "report.png").is_file()


def test_a_bad_row_is_refused_before_any_row_runs(recipe_dir, tmp_path):
    (recipe_dir / "tiny_bad.env").write_text(FAST.replace("NUM_EXAMPLES=64", "NUM_EXAMPLES=1"))
    done = reproduce(recipe_dir, tmp_path / "results", "tiny_ok", "tiny_bad")
    assert done.returncode == 2
    assert done.stderr.strip() == "shardkit: error: recipe tiny_bad: 2 ranks but only 1 examples: every rank needs data"
    assert not (tmp_path / "results" / "full" / "tiny_ok").exists()


def test_timed_out_row_is_a_timeout_result_with_its_steps(recipe_dir, tmp_path):
    (recipe_dir / "tiny_slow.env").write_text(FAST.replace("MAX_STEPS=2", "MAX_STEPS=100000").replace(
        "NUM_EXAMPLES=64", "NUM_EXAMPLES=6000"))
    results = tmp_path / "results"
    reproduce(recipe_dir, results, "tiny_slow", "--timeout", "20")
    doc = json.loads((results / "full" / "tiny_slow" / "results.json").read_text())
    assert doc["status"] == "timeout" and doc["failure"]["message"] == "timed out after 20 s (row time limit)"
    assert doc["exit_code"] == 124 and len(doc["loss"]) == len(doc["time"]["step_times_s"]) > 0


def test_a_row_run_on_another_stack_lands_beside_todays_and_never_passes_for_it(recipe_dir, tmp_path):
    results = tmp_path / "results"

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "shardkit", "run", "tiny_ok", "--results", str(results), *extra],
                              cwd=ROOT, env=cpu_env(SHARDKIT_RECIPES=str(recipe_dir)), capture_output=True, text=True,
                              timeout=900)

    today = run()
    assert today.returncode == 0, today.stderr[-3000:]
    emulated = run("--stack", "2023")
    assert emulated.returncode == 0, emulated.stderr[-3000:]
    for folder, stack in (("full", "today"), ("full-2023-emulated", "2023-emulated")):
        assert json.loads((results / folder / "tiny_ok" / "results.json").read_text())["run"]["stack"] == stack
    printed = subprocess.run([sys.executable, "-m", "shardkit", "run", "tiny_ok", "--results", str(results),
                              "--print-command", "--stack=2023"], cwd=ROOT, env=cpu_env(SHARDKIT_RECIPES=str(recipe_dir)),
                             capture_output=True, text=True, timeout=300)
    assert f"--output_dir {(results / 'full-2023-emulated' / 'tiny_ok').resolve()}" in printed.stdout


def test_rows_for_a_container_are_not_refused_for_what_this_machine_lacks(monkeypatch, tmp_path):
    # The host that drives the containers may have no GPU build of torch, or one without the card's kernels:
    # only a row that runs here is checked against this machine's installation.
    from shardkit.engine import preflight
    from shardkit.errors import UsageError
    from shardkit.orchestration import campaign

    def lacking():
        raise UsageError("this machine's torch cannot run it")

    monkeypatch.setattr(preflight, "check_gpu_kernels", lacking)
    ran = []
    in_container = campaign.Runner(lambda row, timeout_s: ran.append(row.recipe.name) or 0, period=False, here=False)
    campaign.reproduce(["tiny_fsdp_2cpu_bs4"], tmp_path, None, False, None, [], runner=in_container)
    # Nor for a package only the image has (flash_attn is not installed here).
    campaign.reproduce(["tiny_fsdp_2cpu_bs4"], tmp_path / "flash", None, False, None,
                       ["--attn_implementation", "flash_attention_2"], runner=in_container)
    assert ran == ["tiny_fsdp_2cpu_bs4"] * 2
    here = campaign.Runner(lambda row, timeout_s: 0, period=False)
    with pytest.raises(UsageError, match="recipe tiny_fsdp_2cpu_bs4: this machine's torch cannot run it"):
        campaign.reproduce(["tiny_fsdp_2cpu_bs4"], tmp_path / "here", None, False, None, [], runner=here)
