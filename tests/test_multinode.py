"""Beyond one machine: torchrun's c10d rendezvous across launchers, and the Slurm script."""

import json
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, cpu_env, tiny
from shardkit.errors import UsageError
from shardkit.orchestration.slurm import batch_script
from shardkit.spec import recipes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_launchers_on_loopback_form_one_four_rank_fsdp_job(tmp_path):
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "shardkit.train", *tiny(out, "fsdp", "--max_steps", "4"),
                               "--nnodes", "2", "--node_rank", str(rank), "--rdzv_endpoint", endpoint],
                              cwd=ROOT, env=cpu_env(SHARDKIT_RUN_ID=f"test-{endpoint}"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "ok" and doc["run"]["world_size"] == 4 and doc["run"]["global_batch"] == 16
    assert doc["loss"][-1] < doc["loss"][0]
    per_rank = json.loads((out / "sharding.json").read_text())["per_rank"]
    assert sorted(r["rank"] for r in per_rank) == [0, 1, 2, 3]
    for name, held in per_rank[0]["parameters"].items():
        assert [r["parameters"][name]["local"] for r in per_rank] == [held["global"] // 4] * 4, name


def test_slurm_script_runs_one_launcher_per_node_through_one_rendezvous():
    script = batch_script(recipes.load_recipe("llama-65b_zero3-offload_8gpu_bs4"), 2, "shardkit:cuda", "48:00:00",
                          "gpu", "results")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
            "#SBATCH --partition=gpu"} <= set(lines)
    assert 'export NNODES=2 RDZV_ENDPOINT="$head_node:29500"' in lines
    srun = next(line for line in lines if line.startswith("srun"))
    assert "--container-image=shardkit:cuda" in srun
    assert "NODE_RANK=$SLURM_NODEID exec shardkit run llama-65b_zero3-offload_8gpu_bs4 --runner native" in srun
    done = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr


def test_slurm_refuses_gpus_that_do_not_split():
    with pytest.raises(UsageError, match="must split evenly"):
        batch_script(recipes.load_recipe("llama-13b_fsdp_4gpu_bs1"), 3, None, "1:00:00", None, "results")


def test_recipe_reads_its_nodes_from_the_environment(monkeypatch, tmp_path):
    from shardkit.orchestration.campaign import train_argv

    recipe = recipes.load_recipe("llama-7b_fsdp_8gpu_bs4")
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("RDZV_ENDPOINT", "node0:29500")
    argv = train_argv(recipe, tmp_path, [], None)
    assert argv[argv.index("--nproc_per_node") + 1] == "4"
    assert argv[argv.index("--nnodes"):] == ["--nnodes", "2", "--node_rank", "1", "--rdzv_endpoint", "node0:29500"]
    monkeypatch.delenv("RDZV_ENDPOINT")
    with pytest.raises(UsageError, match="needs RDZV_ENDPOINT"):
        train_argv(recipe, tmp_path, [], None)
