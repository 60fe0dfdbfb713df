import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardkit.spec.parallelism import Parallelism
from shardkit.spec.recipes import method_flags

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
    return ["--model_name_or_path", "tiny", "--nproc_per_node", str(ranks),
            *method_flags(Parallelism.from_name(method)),
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_steps", "4",
            "--save_strategy", "no", "--output_dir", str(output_dir), *extra]


def results_of(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


@pytest.fixture
def seed_ds_config() -> Path:
    return SEED_DS_CONFIG


@pytest.fixture
def word_tokenizer(tmp_path):
    """A real tokenizer made locally (nothing downloaded): one id per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "what", "is", "two", "plus", "four", "six", "say", "hi", "hello"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    return folder


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="also run the slow tier (multi-process training, containers); CI runs it")


def pytest_collection_modifyitems(config, items):
    """Two tiers: the fast default and --full. Tests marked gpu skip, with the reason, where torch sees no
    CUDA device (torch is imported only when there are some)."""
    skip_slow = pytest.mark.skip(reason="slow tier: pass --full (nox -s tests-full)")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--full"):
            item.add_marker(skip_slow)
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        for item in marked:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
