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


FSDP = ["--fsdp", "full_shard auto_wrap"]
INERT = {
    "save_steps without a save strategy": (["shardkit.train", *FSDP, "--save_strategy", "no", "--save_steps", "3"],
                                          "--save_steps 3 does nothing with --save_strategy no"),
    "a save limit without a save strategy": (["shardkit.train", *FSDP, "--save_strategy", "no",
                                              "--save_total_limit", "2"], "--save_total_limit 2 does nothing"),
    "saves in a fake world": (["shardkit.train", *FSDP, "--fake_world", "8", "--save_steps", "3"],
                              "--save_steps 3 does nothing with --fake_world 8"),
    "num_examples beside a data set": (["shardkit.train", *FSDP, "--data_path", "data/good.json", "--tokenizer_path",
                                        "{tokenizer}", "--per_device_train_batch_size", "1", "--num_examples", "9"],
                                       "--num_examples 9 does nothing"),
    "a tokenizer without a data set": (["shardkit.train", *FSDP, "--tokenizer_path", "tokenizer_empty"],
                                       "--tokenizer_path tokenizer_empty does nothing without --data_path"),
    # A recipe that does not save (SAVE=False) given a save interval: the case that used to pass in silence.
    "a recipe's save_strategy no": (["shardkit", "run", "tiny_fsdp_2cpu_bs4", "--results", "{out}", "--save_steps",
                                     "3"], "recipe tiny_fsdp_2cpu_bs4: --save_steps 3 does nothing"),
}


@pytest.mark.parametrize("command, fragment", INERT.values(), ids=INERT.keys())
def test_a_flag_that_does_nothing_in_the_combination_given_says_so_in_one_line(command, fragment, folder, tmp_path,
                                                                              word_tokenizer):
    out = tmp_path / "out"
    command = [part.replace("{out}", str(out)).replace("{tokenizer}", str(word_tokenizer)) for part in command]
    if command[0] == "shardkit.train":
        command += ["--output_dir", str(out)]
    result = subprocess.run([sys.executable, "-m", *command, "--dry_run"], cwd=folder, env=cpu_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [line for line in result.stderr.splitlines() if line.startswith("shardkit: note: ")]
    assert len(notes) == 1 and fragment in notes[0], result.stderr[-2000:]
