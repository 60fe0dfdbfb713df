"""The seed's two command lines, run verbatim from recipes/, and what a first hour with the CLI meets (bad input
has its own list: tests/bad_inputs.py)."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RECIPES, ROOT, cpu_env, run_train

SEED = Path(__file__).resolve().parents[1] / "recipes" / "SEED.md"


def seed_blocks() -> dict[str, str]:
    """The two ```-fenced torchrun commands of the seed document, as written."""
    return dict(re.findall(r"### (\w+)\n```\n(torchrun.*?)```", SEED.read_text(), flags=re.S))


SCRIPTS = {"FSDP": RECIPES / "seed_fsdp.sh", "Deepspeed": RECIPES / "seed_deepspeed.sh"}


def test_seed_scripts_are_the_documents_command_lines():
    blocks = seed_blocks()
    assert set(blocks) == set(SCRIPTS)
    for name, script in SCRIPTS.items():
        text = script.read_text()
        assert text.startswith("#!/bin/sh\n") and text.endswith(blocks[name])
        assert text.count("torchrun") == 1  # the rest of the script only comments and changes folder
        assert script.stat().st_mode & 0o111


@pytest.fixture
def torchrun_on_a_free_port(tmp_path_factory) -> str:
    """A PATH whose first torchrun is the real one with any --master_port replaced by a port free now, so
    that tests running the seed's scripts (fixed port 22100) never collide with each other or another run."""
    real = shutil.which("torchrun")
    assert real, "torchrun is not on PATH"
    folder = tmp_path_factory.mktemp("free-port-bin")
    shim = folder / "torchrun"
    shim.write_text(f"""#!{sys.executable}
import os, re, socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
args, skip = [], False
for arg in sys.argv[1:]:
    if skip:
        args.append(port); skip = False
    elif arg == "--master_port" or arg == "--master-port":
        args.append(arg); skip = True
    else:
        args.append(re.sub(r"^(--master[_-]port=).*", lambda m: m.group(1) + port, arg))
os.execv({real!r}, [{real!r}, *args])
""")
    shim.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.mark.parametrize("name, method, global_batch, steps", [
    ("FSDP", "fsdp_offload", 1 * 8 * 8, 3 * (6000 // 8 // 1 // 8)),
    ("Deepspeed", "zero3_offload", 8 * 2 * 8, 3 * (6000 // 8 // 8 // 2)),
])
def test_seed_script_runs_as_dry_run_from_anywhere(name, method, global_batch, steps, tmp_path,
                                                   torchrun_on_a_free_port):
    script = SCRIPTS[name]
    # The script as written, with the dry-run flag after its last line; $0 is the script, as with `sh FILE`.
    # Its fixed --master_port 22100 is taken here, as by another run on the same machine: the torchrun the
    # script finds moves it to a free port, and the script stays verbatim.
    with socket.socket() as taken:
        with contextlib.suppress(OSError):  # already taken by someone else serves as well
            taken.bind(("127.0.0.1", 22100))
            taken.listen()
        result = subprocess.run(["sh", "-c", script.read_text().rstrip("\n") + " --dry_run True", str(script)],
                                cwd=tmp_path, env=cpu_env(PATH=torchrun_on_a_free_port), capture_output=True,
                                text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "parameters   32,528,943,616" in out  # LLaMA-30B
    assert "60 layers, hidden 6656" in out
    assert f"method       {method} " in out
    assert "world size   8" in out
    assert f"= global {global_batch} sequences of 2048 tokens" in out
    assert f"{steps} optimizer steps this run" in out
    assert out.count("world size") == 1  # only rank 0 prints
    assert not any(tmp_path.iterdir())


def test_dry_run_of_7b_prints_its_parameter_count():
    result = run_train(["--model_name_or_path", "decapoda-research/llama-7b-hf", "--fsdp", "full_shard auto_wrap",
                        "--nproc_per_node", "2", "--dry_run"])
    assert result.returncode == 0, result.stderr
    assert "6,738,415,616 (6.74e9)" in result.stdout
    assert "world size   2" in result.stdout


def test_a_memory_size_without_unit_is_gib(capsys):
    from shardkit import cli
    from shardkit.planner import parse_size

    assert parse_size("80", "--gpu-mem") == parse_size("80GB", "--gpu-mem") == 80 * 2**30
    assert parse_size("512B", "--host-mem") == 512  # bytes only when said
    assert cli.main(["plan", "--model", "llama-7b", "--gpus", "4", "--gpu-mem", "80"]) == 0
    bare = capsys.readouterr().out
    assert cli.main(["plan", "--model", "llama-7b", "--gpus", "4", "--gpu-mem", "80GB"]) == 0
    assert bare == capsys.readouterr().out and " 0 of " not in bare


HELP = [["shardkit"]] + [["shardkit", command] for command in
                         ("recipes", "run", "reproduce", "diff", "smoke", "image", "slurm", "plan")] + [["shardkit.train"]]


@pytest.mark.parametrize("command", HELP, ids=" ".join)
def test_help_is_plain_text(command):
    result = subprocess.run([sys.executable, "-m", *command, "--help"], cwd=ROOT, env=cpu_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
    assert "`" not in result.stdout  # no RST or Markdown quotes in a terminal


def test_a_reader_that_leaves_early_ends_the_output_quietly():
    """`shardkit plan --model M --gpus N --json | head -1`: over 100 kB of JSON lines into a pipe closed after one."""
    process = subprocess.Popen([sys.executable, "-m", "shardkit", "plan", "--model", "llama-7b", "--gpus", "4", "--json"],
                               cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 128 + signal.SIGPIPE
    assert json.loads(first)["stack"] == "today"
    assert stderr == ""


def test_run_with_dry_run_prints_the_resolved_row_and_starts_nothing(tmp_path, capsys):
    from shardkit import cli

    assert cli.main(["run", "tiny_fsdp_2cpu_bs4", "--results", str(tmp_path), "--dry_run", "True",
                     "--stack", "2023"]) == 0
    out = capsys.readouterr().out
    assert "method       fsdp (engine native, 2023-emulated stack)" in out and "world size   2" in out
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("train.log"))
