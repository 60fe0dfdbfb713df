"""The container path against a real Docker engine: the project's Dockerfile (cpu flavour, on a Debian base
made here, since no registry is reachable) built through the SDK, recipes run in it, and every way a
container can end. Skips without an engine, unless SHARDKIT_REQUIRE_DOCKER=1 (CI) makes that a failure."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import RECIPES, ROOT, cpu_env
from shardkit.orchestration import campaign, containers
from shardkit.spec import recipes

pytestmark = pytest.mark.slow
IMAGE = "shardkit:cpu-test"


def _unavailable(reason: str):
    if os.environ.get("SHARDKIT_REQUIRE_DOCKER") == "1":
        pytest.fail(f"SHARDKIT_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine():
    try:
        return containers.client()
    except containers.DockerUnavailable as error:
        _unavailable(str(error))


@pytest.fixture(scope="module")
def image(engine):
    """The project's Dockerfile, cpu flavour, built offline from wheels fetched on the host."""
    if shutil.which("debootstrap") is None or os.getuid() != 0:
        _unavailable("making the local base image needs root and debootstrap")
    containers.make_local_base()
    containers.fetch_wheels("cpu")
    image_id = containers.build_image("cpu", tag=IMAGE, base=containers.LOCAL_BASE)
    assert engine.images.get(IMAGE).id == image_id
    yield image_id
    containers.remove_image(engine, IMAGE)


FAST = "MODEL=tiny\nMETHOD=fsdp\nGPUS=2\nBATCH=4\nGRAD_CKPT=False\nGRAD_ACCUM=1\nBF16=False\nMAX_STEPS=2\nNUM_EXAMPLES=64\nSAVE=False\n"


@pytest.fixture
def recipe_dir(tmp_path):
    folder = tmp_path / "recipes"
    shutil.copytree(RECIPES / "configs", folder / "configs")
    shutil.copy(RECIPES / "reference.csv", folder)
    (folder / "tiny_fast.env").write_text(FAST)
    (folder / "tiny_slow.env").write_text(FAST.replace("MAX_STEPS=2", "MAX_STEPS=100000").replace(
        "NUM_EXAMPLES=64", "NUM_EXAMPLES=6000"))
    return folder


def run(image_tag, recipe_dir, name, results, **options):
    recipe = recipes.load_recipe(name, folder=recipe_dir)
    options.setdefault("network", "none")
    options.setdefault("mem_limit", "8g")  # a safety net: a runaway container is killed, not the host
    row = campaign.resolve_row(recipe, campaign.row_dir(results, recipe, None), [], None)
    return containers.run_recipe(image_tag, row, results, options.pop("timeout_s", 600), recipes_dir=recipe_dir,
                                 echo=None, **options)


def result_of(results, name):
    return json.loads((results / "full" / name / "results.json").read_text())


def no_containers_left(engine, name):
    return engine.containers.list(all=True, filters={"label": f"shardkit.recipe={name}"}) == []


def test_image_is_pinned_and_runs_as_non_root(engine, image):
    config = engine.images.get(IMAGE).attrs["Config"]
    assert config["User"] == "shardkit"
    assert "SHARDKIT_FLAVOUR=cpu" in config["Env"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04@sha256:" in dockerfile
    instructions = [line for line in dockerfile.splitlines() if not line.startswith("#")]
    assert not any("--mount" in line for line in instructions)  # docker-py has no BuildKit


def test_recipe_runs_in_the_container_and_results_reach_the_host(engine, image, recipe_dir, tmp_path):
    results = tmp_path / "results"
    assert run(IMAGE, recipe_dir, "tiny_fast", results, gpus=False) == 0
    doc = result_of(results, "tiny_fast")
    assert doc["status"] == "ok" and doc["run"]["world_size"] == 2 and len(doc["loss"]) == 2
    assert doc["environment"]["container_image"] == image
    assert doc["environment"]["versions"]["torch"] == "2.13.0+cpu"  # as the lock pins it
    assert doc["environment"]["versions"]["deepspeed"] == "0.19.8"
    assert (results / "full" / "tiny_fast" / "container.log").read_text().count("step 2/2") == 1
    assert (results / "full" / "tiny_fast" / "results.json").stat().st_uid == containers.IMAGE_USER_ID
    assert no_containers_left(engine, "tiny_fast")


def test_container_killed_for_memory_is_an_oom_result(engine, image, recipe_dir, tmp_path):
    results = tmp_path / "results"
    assert run(IMAGE, recipe_dir, "tiny_fast", results, gpus=False, mem_limit="200m") == 3
    doc = result_of(results, "tiny_fast")
    assert doc["status"] == "oom" and doc["failure"]["device"] == "host"
    assert no_containers_left(engine, "tiny_fast")


def test_time_limit_kills_and_removes_the_container(engine, image, recipe_dir, tmp_path):
    results = tmp_path / "results"
    assert run(IMAGE, recipe_dir, "tiny_slow", results, gpus=False, timeout_s=20) == 124
    doc = result_of(results, "tiny_slow")
    assert doc["status"] == "timeout" and doc["failure"]["message"] == "timed out after 20 s (row time limit)"
    assert no_containers_left(engine, "tiny_slow")


def test_ctrl_c_removes_the_container(engine, image, recipe_dir, tmp_path):
    # A terminal's Ctrl-C meets Python's default handler; a background job (as CI may be) ignores SIGINT,
    # and its children inherit that, so the child restores the handler a person's shell would give it.
    code = (f"import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"import sys; from pathlib import Path; from shardkit.orchestration import campaign, containers; "
            f"from shardkit.spec import recipes; results = Path({str(tmp_path / 'results')!r}); "
            f"recipe = recipes.load_recipe('tiny_slow', folder=Path({str(recipe_dir)!r})); "
            f"row = campaign.resolve_row(recipe, campaign.row_dir(results, recipe, None), [], None); "
            f"containers.run_recipe({IMAGE!r}, row, results, 600, gpus=False, network='none', "
            f"recipes_dir=Path({str(recipe_dir)!r}), echo=None)")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=cpu_env())
    try:
        # Creating the container copies the whole image on the vfs storage driver: minutes under load.
        deadline = time.monotonic() + 600
        while not engine.containers.list(filters={"label": "shardkit.recipe=tiny_slow", "status": "running"}):
            assert time.monotonic() < deadline and process.poll() is None, "the container never started"
            time.sleep(1)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=300)
        assert no_containers_left(engine, "tiny_slow")
    finally:
        if process.poll() is None:
            process.kill()
        for leftover in engine.containers.list(all=True, filters={"label": "shardkit.recipe=tiny_slow"}):
            leftover.remove(force=True)


def test_no_nvidia_runtime_is_one_sentence(engine, image, recipe_dir, tmp_path):
    if containers.has_gpu_runtime(engine):
        pytest.skip("this daemon has an NVIDIA runtime")
    with pytest.raises(containers.DockerUnavailable, match="^the Docker daemon has no NVIDIA runtime"):
        run(IMAGE, recipe_dir, "tiny_fast", tmp_path / "results", gpus=True)


def test_unreachable_daemon_is_one_line(tmp_path):
    env = cpu_env(DOCKER_HOST=f"unix://{tmp_path}/no-daemon.sock")
    done = subprocess.run([sys.executable, "-m", "shardkit", "run", "tiny_fsdp_2cpu_bs4", "--runner", "docker",
                           "--results", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"shardkit: error: cannot reach the Docker daemon at unix://{tmp_path}/no-daemon.sock: start it "
        "(dockerd, or systemctl start docker) or set DOCKER_HOST (DockerException)"]


def test_compose_file_is_valid():
    if shutil.which("docker-compose") is None:
        _unavailable("docker-compose (Debian's) is not installed")
    done = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "capabilities:\n            - gpu" in done.stdout and "memlock: -1" in done.stdout
