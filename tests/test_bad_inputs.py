"""Every case of tests/bad_inputs.py, as a user would meet it: a fresh process, refused before anything runs."""

import importlib.util
import json
import subprocess
import sys

import pytest

from bad_inputs import CASES, files
from conftest import ROOT, cpu_env


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    result = json.loads((ROOT / "tests" / "data" / "tiny_fsdp_2cpu_bs4" / "results.json").read_text())
    for relative, content in files(result).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return root


def written(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_the_cases_have_distinct_names():
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, folder):
    if case.unless_installed and importlib.util.find_spec(case.unless_installed):
        pytest.skip(f"{case.unless_installed} is installed here: the input is good")
    out = folder / "out" / case.name
    command = [part.replace("{out}", str(out)).replace("{repo}", str(ROOT)) for part in case.command]
    before = written(folder)
    result = subprocess.run([sys.executable, "-m", *command], cwd=folder, env=cpu_env(), capture_output=True,
                            text=True, timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("shardkit: error: "), result.stderr[-2000:]
    for fragment in (case.fragment,) if isinstance(case.fragment, str) else case.fragment:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists()
    assert written(folder) == before
