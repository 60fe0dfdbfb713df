"""DeepSpeed's op cache: a build is keyed by what makes the binary, not by where the sources lie or when they
were written, and a build that is needed says why. The compile itself runs in the slow tier (the ZeRO-3
rows of tests/test_faults.py and tests/test_training.py); these tests key real DeepSpeed builders."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

deepspeed = pytest.importorskip("deepspeed")

from shardkit.engine import deepspeed_ops  # noqa: E402

NAMES = ["CPUAdamBuilder", "FusedAdamBuilder", "ShareMemCommBuilder"]


@pytest.fixture(autouse=True)
def _cpu_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def builder_at(name: str, root: Path):
    """DeepSpeed's builder for ``name`` reading its sources from a copy of DeepSpeed's tree at ``root``: what
    another environment (another venv, a reinstall) hands the build."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(name)
    builder.deepspeed_src_path = lambda path: path if os.path.isabs(path) else str(root / path)
    return builder


@pytest.fixture
def two_trees(tmp_path):
    package = Path(deepspeed.__file__).parent
    first, second = tmp_path / "env-a" / "deepspeed", tmp_path / "env-b" / "deepspeed"
    for tree in (first, second):
        shutil.copytree(package / "ops" / "csrc", tree / "csrc", copy_function=shutil.copy)
    for f in second.rglob("*"):
        os.utime(f, (1, 1))  # a reinstall writes other times
    return first, second


@pytest.mark.parametrize("name", NAMES)
def test_two_environments_with_the_same_sources_at_other_paths_and_times_share_a_build(two_trees, name):
    first, second = two_trees
    assert deepspeed_ops.key_of(deepspeed_ops.key_fields(builder_at(name, first))) == \
        deepspeed_ops.key_of(deepspeed_ops.key_fields(builder_at(name, second)))


def test_a_changed_header_is_another_build_and_the_announcement_names_what_differs(two_trees, tmp_path):
    first, second = two_trees
    fields = deepspeed_ops.key_fields(builder_at("CPUAdamBuilder", first))
    cache = tmp_path / "cache"
    key = deepspeed_ops.key_of(fields)
    (cache / key).mkdir(parents=True)
    (cache / key / "cpu_adam.json").write_text(json.dumps(fields))
    header = next((second / "csrc" / "includes").glob("*.h"))
    header.write_text(header.read_text() + "\n// a patched DeepSpeed\n")
    changed = deepspeed_ops.key_fields(builder_at("CPUAdamBuilder", second))
    assert deepspeed_ops.key_of(changed) != key
    assert deepspeed_ops.why_build("cpu_adam", changed, cache) == "a cached build differs in sources"
    assert deepspeed_ops.why_build("cpu_adam", {**fields, "torch": "9.9.9"}, cache) == \
        "a cached build differs in torch"
    assert deepspeed_ops.why_build("fused_adam", fields, cache) == "none built on this machine yet"


def test_the_key_holds_the_versions_the_compiler_and_the_flags_without_the_environments_paths(two_trees):
    import torch

    first, _ = two_trees
    fields = deepspeed_ops.key_fields(builder_at("CPUAdamBuilder", first))
    assert fields["deepspeed"] == deepspeed.__version__ and fields["torch"] == torch.__version__
    assert fields["compiler"].startswith(os.environ.get("CXX", "c++") + ": ")
    assert fields["flags"] and not any(str(first) in f or sys.prefix in f for f in fields["flags"])


def test_a_rank_loads_what_its_launcher_named_and_deepspeed_then_builds_nothing(monkeypatch, tmp_path):
    """A stand-in binary (a Python file: the loader takes any module file) proves the registry is what
    DeepSpeed's own load() reads."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    module = tmp_path / "cpu_adam_standin.py"
    module.write_text("MARK = 'the cached binary'\n")
    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})
    monkeypatch.setenv(deepspeed_ops.PRELOAD_ENV, f"cpu_adam={module}")
    deepspeed_ops.preload()
    assert builder_at("CPUAdamBuilder", tmp_path).load().MARK == "the cached binary"
