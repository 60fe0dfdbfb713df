"""Sessions over the shardkit package; `nox --list` shows them. Heavy ones are not run by default."""

import hashlib
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"
# A session's environment is kept between runs (nox --reuse-venv=no recreates it): recreating it
# reinstalled torch and the rest on every run, most of a second `nox -s smoke`.
nox.options.reuse_venv = "yes"

# The CPU wheel that lies on this project's machines. Installed first, so that nothing resolves the
# unpinned `torch` requirement to a multi-GB CUDA build.
TORCH_CPU = "torch==2.13.0"


def install_once(session: nox.Session, name: str, inputs: str, *installs: list[str]) -> None:
    """Each of ``installs`` (pip's arguments), skipped in a kept environment whose stamp says they were made
    from the same ``inputs`` (the files and pins they come from)."""
    wanted = hashlib.sha256(inputs.encode()).hexdigest()
    stamp = Path(session.virtualenv.location) / f".shardkit-{name}"
    if stamp.exists() and stamp.read_text() == wanted:
        session.log(f"kept environment: {name} already installed from these files")
        return
    for args in installs:
        session.install(*args)
    stamp.write_text(wanted)


def install(session: nox.Session, extras: str = "test") -> None:
    """torch's CPU wheel, then shardkit editable with ``extras`` (shardkit's own code is editable: a change to
    it needs no install, a change to pyproject.toml does)."""
    install_once(session, extras, f"{TORCH_CPU} {extras} {Path('pyproject.toml').read_text()}",
                 [TORCH_CPU], ["-e", f".[{extras}]"])


def pytest(session: nox.Session, *args: str) -> None:
    install(session)
    session.run("pytest", *args, *session.posargs, env={"DS_ACCELERATOR": "cpu"})


@nox.session
def tests(session: nox.Session) -> None:
    """The fast tier on CPU: no multi-process training (about 2 minutes); GPU tests skip without a GPU."""
    pytest(session)


@nox.session(name="tests-full", default=False)
def tests_full(session: nox.Session) -> None:
    """Both tiers, what CI runs: also multi-rank training over gloo, DeepSpeed on CPU, containers."""
    pytest(session, "--full")


@nox.session
def lint(session: nox.Session) -> None:
    """Lint and check import order with ruff."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "recipes", "benchmarks", "noxfile.py", *session.posargs)


@nox.session
def smoke(session: nox.Session) -> None:
    """The kit's main job on its embedded default: tiny recipes, four methods, 2 CPU ranks, diffed and reported."""
    if shutil.which("g++") is None:
        session.skip("g++ is needed to JIT-build DeepSpeed's CPU ops")
    install(session)
    session.run("shardkit", "smoke", *session.posargs, env={"DS_ACCELERATOR": "cpu"})


@nox.session(python="3.10", default=False)
def period(session: nox.Session) -> None:
    """The period image's stack on CPU, from its hash-locked files (Python 3.10, torch 2.0.1, transformers
    4.28.1, DeepSpeed 0.9.2, pydantic 1.10): the worker path's imports, the seed's dry runs, the refusals of
    what needs a GPU there, the results document, the diff and report, the seed's DeepSpeed schedule (2-5
    minutes the first time, most of it the 3 GB download; about 35 s in the kept environment)."""
    locks = ["requirements/build.lock", "requirements/period.lock", "requirements/period-deepspeed.lock"]
    # Kept between runs like the others: a second run neither downloads nor reinstalls the 3 GB stack.
    install_once(session, "period", "".join(Path(name).read_text() for name in [*locks, "pyproject.toml"]),
                 ["--require-hashes", "--no-deps", "-r", locks[0]],
                 ["--require-hashes", "-r", locks[1]],
                 ["--require-hashes", "--no-deps", "--no-build-isolation", "-r", locks[2]],
                 ["--no-deps", "--no-build-isolation", "-e", "."],
                 ["pytest"])
    session.run("pip", "check")
    session.run("pytest", "tests/test_period.py", "tests/test_diff.py",
                "tests/test_cli.py::test_seed_script_runs_as_dry_run_from_anywhere",
                "tests/test_recipes.py::test_the_seeds_deepspeed_schedule_holds_the_first_two_steps_at_lr_zero",
                *session.posargs, env={"DS_ACCELERATOR": "cpu"})


@nox.session(venv_backend="none", default=False)
def reproduce(session: nox.Session) -> None:
    """Run recipes on the visible GPUs, then diff and report: -- [RECIPES] [--probe N] [--force] [--timeout S]."""
    # Runs in the current environment (the image's CUDA torch), never a fresh venv with the CPU wheel.
    if shutil.which("nvidia-smi") is None and not any(arg.startswith("tiny") for arg in session.posargs):
        session.skip("no GPU visible (nvidia-smi not found): `nox -s smoke` is the CPU path")
    session.run("shardkit", "reproduce", *session.posargs)


@nox.session(default=False)
def build(session: nox.Session) -> None:
    """Build the image through the Docker SDK: -- [cuda|cpu|period] (cpu also makes the local Debian base)."""
    flavour = session.posargs[0] if session.posargs else "cuda"
    install(session, extras="docker")
    session.run("shardkit", "image", "wheels", "--flavour", flavour)
    if flavour == "cpu":
        session.run("shardkit", "image", "base")
    session.run("shardkit", "image", "build", "--flavour", flavour)


@nox.session(default=False)
def diff(session: nox.Session) -> None:
    """Diff results against the reference and write the report: -- [RESULTS...] [--strict] [--report DIR].
    RESULTS are results.json files or folders searched below; none: every result under results/."""
    install(session, extras="deepspeed")
    session.run("shardkit", "diff", *session.posargs)
