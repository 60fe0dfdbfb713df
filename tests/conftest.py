import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SEED_DS_CONFIG = RECIPES / "configs" / "deepspeed_config.json"


def cpu_env(**extra) -> dict:
    # DeepSpeed picks its accelerator at import; without a GPU it must be told to use the CPU.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_train(args: list[str], cwd: Path | None = None, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    """`python -m shardkit.train ARGS` in a fresh process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "shardkit.train", *args], cwd=cwd or ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=timeout, **popen)


def tiny(output_dir: Path, method: str, *extra: str, ranks: int = 2) -> list[str]:
    """A short tiny-model run with one of the table's four methods (learnable synthetic data)."""
    methods = {
        "fsdp": ["--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"],
        "fsdp_offload": ["--fsdp", "full_shard auto_wrap offload"],
        "zero3": ["--deepspeed", str(RECIPES / "configs" / "zero3_no_offload.json")],
        "zero3_offload": ["--deepspeed", str(SEED_DS_CONFIG)],
    }
    return ["--model_name_or_path", "tiny", "--nproc_per_node", str(ranks), *methods[method],
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_steps", "4",
            "--save_strategy", "no", "--output_dir", str(output_dir), *extra]


def results_of(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


@pytest.fixture
def seed_ds_config() -> Path:
    return SEED_DS_CONFIG
