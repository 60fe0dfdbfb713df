"""How a run's ending becomes its result, without starting ranks: the launcher's choice of cause, and bad
input found inside a rank."""

import os
import signal

import pytest

from shardkit.engine import launch
from shardkit.engine.rank import RankState, fail
from shardkit.errors import UsageError
from shardkit.results.failure import Failure
from shardkit.results.files import write_json_atomic
from shardkit.results.record import Recorder
from shardkit.spec.flags import make_config
from shardkit.spec.resolve import Launch, resolve


def tiny_run(tmp_path, ranks=2):
    cfg = make_config({"model_name_or_path": "tiny", "fsdp": "full_shard auto_wrap", "output_dir": str(tmp_path),
                       "per_device_train_batch_size": 4, "max_steps": 4})
    return resolve(cfg, Launch(nproc_per_node=ranks))


def test_bad_input_found_inside_a_rank_is_one_line_and_exit_2_with_no_results(tmp_path, capsys):
    run = tiny_run(tmp_path)
    code = fail(RankState(run, 1, 0.0, Recorder()), UsageError("--tokenizer_path 'tok': no pad token"))
    assert code == 2 and capsys.readouterr().err == "shardkit: error: --tokenizer_path 'tok': no pad token\n"
    assert fail(RankState(run, 0, 0.0, Recorder()), UsageError("the same, seen by rank 0")) == 2
    assert capsys.readouterr().err == ""  # one line for the run, not one per rank
    assert launch.finish(run, 0.0, [(1, 2), (0, 2)]) == 2
    assert not (tmp_path / "results.json").exists()


def _peer_failure_result(run, tmp_path, kind="error"):
    """What a surviving rank writes when its peer vanished (the fields the launcher reads)."""
    from shardkit.results import document

    failure = Failure(kind=kind, rank=0, step=5, message="a peer left the job (Connection reset by peer)",
                      caused_by_peer=kind != "interrupted")
    recorder = Recorder(loss=[5.0, 4.0, 3.0, 2.0], step_times_s=[0.1] * 4)
    write_json_atomic(tmp_path / "results.json", document.document(
        status=failure.status, run=run, recorder=recorder, per_rank=[], environment=None, data_info=None,
        failure=failure, launch_time=0.0, now=1.0))


@pytest.mark.parametrize("oom_kills, status", [((3, 3), "killed"), ((3, 4), "oom"), ((None, None), "killed")])
def test_a_peer_killed_by_a_signal_is_the_cause_and_an_oom_only_with_the_kernels_count(tmp_path, oom_kills,
                                                                                      status):
    run = tiny_run(tmp_path)
    _peer_failure_result(run, tmp_path)
    code = launch.finish(run, 0.0, [(0, 1), (1, -signal.SIGKILL)], oom_kills)
    doc = launch.read_json(tmp_path / "results.json")
    assert doc["status"] == status and code == doc["exit_code"]
    assert doc["failure"]["rank"] == 1 and "rank 0 then reported: a peer left" in doc["failure"]["message"]
    assert doc["loss"] == [5.0, 4.0, 3.0, 2.0]  # what the run did is kept


def test_after_a_collective_timeout_the_rank_that_did_not_answer_sigterm_stalled(tmp_path):
    run = tiny_run(tmp_path)
    _peer_failure_result(run, tmp_path, kind="timeout")
    assert launch.finish(run, 0.0, [(0, 124), (1, -signal.SIGKILL)]) == 124
    failure = launch.read_json(tmp_path / "results.json")["failure"]
    assert failure["kind"] == "timeout" and failure["rank"] == 1 and "stalled" in failure["message"]


def test_a_heartbeat_that_fell_behind_names_the_stalled_rank(tmp_path):
    run = tiny_run(tmp_path, ranks=3)
    _peer_failure_result(run, tmp_path, kind="timeout")
    beats = tmp_path / ".heartbeats"
    beats.mkdir()
    for rank, step in ((0, 7), (1, 7), (2, 4)):
        (beats / f"rank{rank}").write_text(f"{step} 0.0 {os.getpid()}\n")
    launch.finish(run, 0.0, [(0, 124), (1, 124)])
    failure = launch.read_json(tmp_path / "results.json")["failure"]
    assert failure["rank"] == 2 and failure["step"] == 5 and "after step 4" in failure["message"]


def test_an_interrupted_run_stays_interrupted_unless_a_rank_died_first(tmp_path):
    run = tiny_run(tmp_path)
    _peer_failure_result(run, tmp_path, kind="interrupted")
    assert launch.finish(run, 0.0, [], interrupted=True) == 130
    assert launch.read_json(tmp_path / "results.json")["failure"]["rank"] == 0
    # Not interrupted itself, the launcher reads a rank's SIGTERM as the job ending around a dead peer.
    _peer_failure_result(run, tmp_path, kind="interrupted")
    assert launch.finish(run, 0.0, [(1, -signal.SIGKILL), (0, 130)]) == 137
