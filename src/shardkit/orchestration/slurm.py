"""A Slurm batch script for a recipe on several nodes: one task per node, each a shardkit launcher (in a
container through pyxis/enroot when an image is given), joined by torchrun's c10d rendezvous on the first
node."""

from __future__ import annotations

import shlex

from ..errors import UsageError
from ..spec.recipes import Recipe

RDZV_PORT = 29500


def batch_script(recipe: Recipe, nodes: int, image: str | None, time_limit: str, partition: str | None,
                 results: str) -> str:
    if nodes < 1:
        raise UsageError(f"--nodes {nodes}: must be at least 1")
    if recipe.gpus % nodes:
        raise UsageError(f"--nodes {nodes}: recipe {recipe.name} has {recipe.gpus} GPUs, which must split evenly")
    per_node = recipe.gpus // nodes
    container = f" --container-image={shlex.quote(image)} --container-mounts=$PWD/{results}:/results" if image else ""
    results_arg = "/results" if image else results
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=shardkit-{recipe.name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={per_node}",
        "#SBATCH --exclusive",
        f"#SBATCH --time={time_limit}",
        *([f"#SBATCH --partition={partition}"] if partition else []),
        "set -euo pipefail",
        "# The first node hosts the c10d rendezvous; every node starts its own ranks through it.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export NNODES={nodes} RDZV_ENDPOINT=\"$head_node:{RDZV_PORT}\"",
        f"mkdir -p {shlex.quote(results)}",
        f"srun{container} bash -c 'NODE_RANK=$SLURM_NODEID exec shardkit run {shlex.quote(recipe.name)} "
        f"--runner native --results {results_arg}'",
        "",
    ]
    return "\n".join(lines)
