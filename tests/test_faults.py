"""Faults injected into real 2-rank CPU runs of the tiny model: each run must end within a bound, leave no
process behind, and leave a results.json whose status says what happened, with the steps done; nothing
written earlier is lost."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, cpu_env, results_of, tiny

pytestmark = pytest.mark.slow

LONG = ("--max_steps", "100000", "--num_examples", "6000", "--collective_timeout_s", "10")


def start(args: list[str], **extra_env) -> subprocess.Popen:
    """A launcher in a session of its own, as a shell's job would be; stdout and stderr kept."""
    return subprocess.Popen([sys.executable, "-m", "shardkit.train", *args], cwd=ROOT, env=cpu_env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def heartbeats(out: Path) -> dict[int, tuple[int, int]]:
    """{rank: (last finished step, pid)} from the ranks' heartbeat files."""
    found = {}
    for path in (out / ".heartbeats").glob("rank*"):
        try:
            step, _, pid = path.read_text().split()
        except (OSError, ValueError):
            continue
        found[int(path.name.removeprefix("rank"))] = (int(step), int(pid))
    return found


def wait_for_steps(out: Path, process: subprocess.Popen, steps: int = 3, limit: float = 180) -> dict:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        beats = heartbeats(out)
        if len(beats) == 2 and min(step for step, _ in beats.values()) >= steps:
            return beats
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no heartbeat at step {steps} within {limit} s")


def ended_within(process: subprocess.Popen, seconds: float) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"still running {seconds} s after the fault") from None
    return process.returncode, stderr


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_no_process_left(pids, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if alive(pid)], "ranks outlived their run"


def run_with_fault(tmp_path, fault, within: float) -> tuple[int, str, dict]:
    """A long 2-rank run, hit by ``fault(launcher, {rank: pid})`` once both ranks finished 3 steps; returns
    its exit code, its stderr and its results, after checking that it ended within the bound and left no
    rank behind."""
    out = tmp_path / "run"
    launcher = start(tiny(out, "fsdp", *LONG))
    beats = wait_for_steps(out, launcher)
    fault(launcher, {rank: pid for rank, (_, pid) in beats.items()})
    code, stderr = ended_within(launcher, within)
    assert_no_process_left([pid for _, pid in beats.values()])
    return code, stderr, results_of(out)


def test_kill_9_of_one_rank_names_it_and_keeps_the_steps(tmp_path):
    code, stderr, doc = run_with_fault(tmp_path, lambda launcher, ranks: os.kill(ranks[1], signal.SIGKILL), 60)
    assert code == 137 and doc["status"] == "killed" and doc["exit_code"] == 137
    failure = doc["failure"]
    assert failure["rank"] == 1 and "SIGKILL" in failure["message"]
    assert "no OOM kill" in failure["evidence"] or "cannot be read" in failure["evidence"]
    assert len(doc["loss"]) >= 3 and "shardkit: killed: rank 1" in stderr and "Traceback" not in stderr


def test_kill_9_of_the_launcher_ends_its_ranks_with_a_result(tmp_path):
    _, _, doc = run_with_fault(tmp_path, lambda launcher, ranks: os.kill(launcher.pid, signal.SIGKILL), 10)
    assert doc["status"] == "interrupted" and "its launcher is gone" in doc["failure"]["message"]
    assert len(doc["loss"]) >= 3


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_sigint_sigterm_and_sighup_record_an_interrupted_run_with_its_steps(tmp_path, sig):
    code, stderr, doc = run_with_fault(tmp_path, lambda launcher, ranks: os.kill(launcher.pid, sig), 60)
    assert code == 130 and doc["status"] == "interrupted" and doc["exit_code"] == 130
    assert len(doc["loss"]) >= 3 and doc["failure"]["message"].startswith(("SIGINT", "SIGTERM", "SIGHUP"))
    assert "Traceback" not in stderr


def test_a_stopped_rank_is_named_within_the_collective_timeout(tmp_path):
    # 10 s of collective timeout, then up to 30 s for the agent's SIGTERM to go unanswered before SIGKILL.
    code, _, doc = run_with_fault(tmp_path, lambda launcher, ranks: os.kill(ranks[1], signal.SIGSTOP), 90)
    assert code == 124 and doc["status"] == "timeout"
    assert doc["failure"]["rank"] == 1 and "stalled" in doc["failure"]["message"]


def test_a_full_disk_mid_run_does_not_block_the_ranks(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    row = None
    try:
        row = subprocess.Popen([sys.executable, "-m", "shardkit", "run", "tiny_fsdp_2cpu_bs4", "--results", str(disk),
                                "--max_steps", "400", "--num_examples", "6000"], cwd=ROOT, env=cpu_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        said = []
        reader = threading.Thread(target=lambda: said.extend(iter(row.stderr.readline, "")), daemon=True)
        reader.start()
        out = disk / "full" / "tiny_fsdp_2cpu_bs4"
        beats = wait_for_steps(out, row, steps=5)
        filler = disk / "filler"
        # Until ENOSPC, in pages: the row's log then needs a page that is not there. The disk stays full
        # until the row says it stopped logging (a loaded machine takes longer to fill the log's last page).
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
        deadline = time.monotonic() + 240
        while not any("no longer logging this row" in line for line in said):
            assert time.monotonic() < deadline and row.poll() is None, "".join(said)[-3000:]
            time.sleep(0.5)
        filler.unlink()
        try:
            code = row.wait(timeout=300)
        except subprocess.TimeoutExpired:
            raise AssertionError("still running 300 s after the disk was freed") from None
        reader.join(timeout=10)
        assert_no_process_left([pid for _, pid in beats.values()])
        assert code == 0, "".join(said)[-3000:]
        assert results_of(out)["status"] == "ok" and len(results_of(out)["loss"]) == 400
    finally:
        if row is not None and row.poll() is None:  # a failed check must not leave the row running on the lazily unmounted disk
            os.killpg(row.pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(disk)])


def test_a_corrupt_checkpoint_is_refused_before_any_rank_starts(tmp_path):
    out = tmp_path / "run"
    steps = ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2"]
    first = subprocess.run([sys.executable, "-m", "shardkit.train", *tiny(out, "fsdp", *steps)], cwd=ROOT,
                           env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    earlier = (out / "results.json").read_bytes()
    shard = sorted((out / "checkpoint-3").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    shard.write_bytes(bytes(data))
    resumed = subprocess.run([sys.executable, "-m", "shardkit.train",
                              *tiny(out, "fsdp", *steps, "--resume_from_checkpoint", "latest")],
                             cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 2 and resumed.stderr.strip().count("\n") == 0, resumed.stderr
    assert str(shard) in resumed.stderr and "sha256 differs" in resumed.stderr
    # An edited step is caught the same way, in the manifest that carries it.
    manifest = out / "checkpoint-2" / "manifest.json"
    edited = json.loads(manifest.read_text())
    edited["step"] = 1
    manifest.write_text(json.dumps(edited))
    again = subprocess.run([sys.executable, "-m", "shardkit.train",
                            *tiny(out, "fsdp", *steps, "--resume_from_checkpoint", str(manifest.parent))],
                           cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "content was changed" in again.stderr
    assert (out / "results.json").read_bytes() == earlier  # refused before anything was touched


def test_a_resume_from_another_methods_checkpoint_is_one_line_naming_both_before_any_rank_starts(tmp_path):
    out = tmp_path / "run"
    steps = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    first = subprocess.run([sys.executable, "-m", "shardkit.train", *tiny(out, "fsdp", *steps)], cwd=ROOT,
                           env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    earlier = (out / "results.json").read_bytes()
    other = subprocess.run([sys.executable, "-m", "shardkit.train",
                            *tiny(out, "zero3", *steps, "--resume_from_checkpoint", str(out / "checkpoint-2"))],
                           cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(lines) == 1, other.stderr[-2000:]
    assert ("a checkpoint of fsdp on 2 ranks, model tiny, today stack; this run is zero3 on 2 ranks, model tiny, "
            "today stack") in lines[0]
    assert (out / "results.json").read_bytes() == earlier  # refused when resolved: no rank wrote anything


def test_a_second_run_into_the_same_folder_is_refused_and_the_first_keeps_its_results(tmp_path):
    out = tmp_path / "run"
    first = start(tiny(out, "fsdp", *LONG))
    beats = wait_for_steps(out, first)
    second = subprocess.run([sys.executable, "-m", "shardkit.train", *tiny(out, "fsdp", "--max_steps", "2")],
                            cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert f"in use by pid {first.pid}" in second.stderr
    os.kill(first.pid, signal.SIGTERM)
    code, _ = ended_within(first, 60)
    assert_no_process_left([pid for _, pid in beats.values()])
    assert code == 130 and results_of(out)["status"] == "interrupted"


def test_a_second_campaign_into_the_same_folder_is_refused(tmp_path):
    from shardkit.results.lock import folder_lock

    with folder_lock(tmp_path / "full", "a campaign"):
        done = subprocess.run([sys.executable, "-m", "shardkit", "reproduce", "tiny_fsdp_2cpu_bs4", "--results",
                               str(tmp_path)], cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "in use by pid" in done.stderr
    assert not (tmp_path / "full" / "tiny_fsdp_2cpu_bs4").exists()


def test_a_time_limit_during_the_op_build_leaves_no_lock_that_blocks_the_next_run(tmp_path):
    cache = tmp_path / "cache"  # an op cache of its own, so that the build starts from nothing
    env = cpu_env(XDG_CACHE_HOME=str(cache))
    results = tmp_path / "results"
    command = [sys.executable, "-m", "shardkit", "run", "tiny_zero3_2cpu_bs4", "--results", str(results)]
    cut = subprocess.run([*command, "--timeout", "20"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert cut.returncode == 124, cut.stderr[-3000:]
    assert "compiling DeepSpeed's" in cut.stderr and "none built on this machine yet" in cut.stderr
    assert results_of(results / "full" / "tiny_zero3_2cpu_bs4")["status"] == "timeout"
    assert list(cache.rglob("lock")), "the build was not cut short: nothing to test"
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert results_of(results / "full" / "tiny_zero3_2cpu_bs4")["status"] == "ok"
    # Built once, every later run loads the binaries, whatever the sources' times
    assert not list(cache.rglob("build/*/*")) and len(list(cache.rglob("*.so"))) == 2
    again = subprocess.run([*command[:-1], str(tmp_path / "again")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "compiling" not in again.stderr, again.stderr[-3000:]
    assert "built successfully" not in again.stdout + again.stderr
    shutil.rmtree(cache, ignore_errors=True)
