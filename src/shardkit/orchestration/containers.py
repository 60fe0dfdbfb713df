"""Images and containers through the Docker SDK for Python (docker-py).

Builds stream their output as it comes and fail on the daemon's error, never on a missing "successfully
tagged" line; a recipe's container is killed and removed in every case, Ctrl-C included. No client is
created at import time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ..errors import UsageError
from ..results.document import RESULTS_FILE
from ..results.failure import Failure
from ..results.files import read_json
from .row import Row, record_failure

ROOT = Path(__file__).resolve().parents[3]
IMAGE_USER_ID = 1000  # the Dockerfile's non-root user
DEFAULT_TAGS = {"cuda": "shardkit:cuda", "cpu": "shardkit:cpu", "period": "shardkit:period"}
# The period flavour's build arguments. Ubuntu 22.04's own Python is 3.10, the period's. torch 2.0.1 brings
# its CUDA 11.7 libraries as wheels; the base's nvcc only compiles DeepSpeed's ops, for A100 (sm_80) and A10 /
# RTX 30xx (sm_86), the cards that torch build has kernels for. 11.8 against torch's 11.7 passes both checks:
# torch 2.0's extension builder refuses only another major version, DeepSpeed 0.9.2's op builder accepts any
# two 11.x (its cuda_minor_mismatch_ok). Tag and the digest published for it (seen pinned in more than one
# public Dockerfile; no 11.7 digest was found pinned).
PERIOD_BUILD_ARGS = {
    "BASE_IMAGE": "nvidia/cuda:11.8.0-cudnn8-devel-ubuntu22.04"
                  "@sha256:8f9dd0d09d3ad3900357a1cf7f887888b5b74056636cd6ef03c160c3cd4b1d95",
    "TORCH_CUDA_ARCH_LIST": "8.0 8.6",
}
# Each flavour's lock files, installed in this order (requirements/).
LOCKS = {"cuda": ("build", "cuda", "deepspeed"), "cpu": ("build", "cpu", "deepspeed"),
         "period": ("build", "period", "period-deepspeed")}
# The Python the wheels are fetched for: the image's, not this machine's.
WHEEL_PYTHON = {"cuda": "3.12", "period": "3.10"}
LOCAL_BASE = "shardkit-base:bookworm"


class DockerUnavailable(UsageError):
    """The daemon cannot be reached, or cannot give containers GPUs."""


class BuildFailed(Exception):
    """The daemon reported an error while building; the message is its last line."""


def client():
    try:
        import docker
    except ImportError:
        raise DockerUnavailable("the Docker SDK for Python is not installed (pip install 'shardkit[docker]')") from None
    try:
        # Generous API timeout: creating a container copies the whole image on the vfs storage driver.
        connection = docker.from_env(timeout=900)
        connection.ping()
    except docker.errors.DockerException as error:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise DockerUnavailable(f"cannot reach the Docker daemon at {where}: start it (dockerd, or systemctl start "
                                f"docker) or set DOCKER_HOST ({type(error).__name__})") from None
    return connection


def has_gpu_runtime(connection) -> bool:
    return "nvidia" in connection.info().get("Runtimes", {})


# --- images ----------------------------------------------------------------------------------------

# pip matches a --platform tag exactly: the older manylinux tags a glibc 2.28 image also runs are named too.
MANYLINUX = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def fetch_wheels(flavour: str, folder: Path = ROOT / "build" / "wheels") -> Path:
    """Download every locked distribution into the build context, so that the build needs no network."""
    folder.mkdir(parents=True, exist_ok=True)
    platform = [] if flavour == "cpu" else ["--python-version", WHEEL_PYTHON[flavour], "--implementation", "cp",
                                            *[arg for tag in MANYLINUX for arg in ("--platform", tag)]]
    for lock in LOCKS[flavour]:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                        "-r", str(ROOT / "requirements" / f"{lock}.lock"), "-d", str(folder), *platform], check=True)
    return folder


def make_local_base(tag: str = LOCAL_BASE, suite: str = "bookworm") -> str:
    """A Debian base image made here (no registry needed): debootstrap a root file system with Python, venv,
    headers and g++ (for DeepSpeed's CPU ops), then import it. Needs root and Debian's debootstrap."""
    connection = client()
    if connection.images.list(name=tag):
        return tag
    if shutil.which("debootstrap") is None:
        raise UsageError("debootstrap is needed to make the local base image (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="shardkit-rootfs-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase",
                        "--include=python3,python3-venv,python3-pip,python3-dev,g++,ca-certificates",
                        suite, str(rootfs), "http://deb.debian.org/debian"], check=True, stdout=subprocess.DEVNULL)
        archive = Path(scratch) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], check=True)
        repository, _, version = tag.partition(":")
        connection.api.import_image_from_file(str(archive), repository=repository, tag=version or "latest")
    return tag


def build_image(flavour: str, tag: str | None = None, base: str | None = None, context: Path = ROOT,
          echo=sys.stderr) -> str:
    """Build the project's Dockerfile; streams the log and returns the image id."""
    from ..engine.environment import git_commit

    connection = client()
    if not (context / "build" / "wheels").is_dir():
        raise UsageError(f"{context / 'build' / 'wheels'}: no wheels; fetch them first (shardkit image wheels "
                         f"--flavour {flavour})")
    buildargs = {"FLAVOUR": flavour, "GIT_COMMIT": git_commit() or "unknown",
                 **(PERIOD_BUILD_ARGS if flavour == "period" else {})}
    if base:
        buildargs["BASE_IMAGE"] = base
    image_id = None
    for chunk in connection.api.build(path=str(context), tag=tag or DEFAULT_TAGS[flavour], buildargs=buildargs,
                                      rm=True, forcerm=True, decode=True, pull=False):
        if "stream" in chunk:
            echo.write(chunk["stream"])
            echo.flush()
        if "error" in chunk:
            message = chunk["error"].strip()
            if "no space left on device" in message:
                message += f" under the daemon's {_docker_root(connection)}: free it (docker system prune)"
            raise BuildFailed(f"docker build failed: {message}")
        image_id = chunk.get("aux", {}).get("ID", image_id)
    if image_id is None:
        raise BuildFailed("docker build ended without an image id")
    return image_id


def _docker_root(connection) -> str:
    """Where the daemon keeps its layers, with the space left there when that folder is on this machine."""
    root = connection.info().get("DockerRootDir", "root folder")
    try:
        return f"{root} ({shutil.disk_usage(root).free / 2**30:.1f} GiB free)"
    except OSError:
        return root


def remove_image(connection, tag: str) -> None:
    """Remove an image with the layers of its build that no other image shares, so repeated builds do not
    fill the disk (a daemon on the vfs storage driver copies the whole file system for every layer)."""
    import docker

    try:
        connection.images.remove(tag, force=True)
    except docker.errors.ImageNotFound:
        pass


def image_flavour(connection, image: str) -> str:
    """cuda, cpu or period, as the image's SHARDKIT_FLAVOUR says (set by the Dockerfile)."""
    import docker

    try:
        env = connection.images.get(image).attrs["Config"].get("Env") or []
    except docker.errors.ImageNotFound:
        raise UsageError(f"--image {image}: no such image here (shardkit image build, or nox -s build)") from None
    return next((e.split("=", 1)[1] for e in env if e.startswith("SHARDKIT_FLAVOUR=")), "cuda")


def image_digest(connection, image: str) -> str:
    """The registry digest when the image came from one, else the local image id."""
    found = connection.images.get(image)
    return (found.attrs.get("RepoDigests") or [found.id])[0]


# --- running a recipe ----------------------------------------------------------------------------

def _stream_logs(container, log_path: Path, echo) -> None:
    with open(log_path, "a") as log:
        for chunk in container.logs(stream=True, follow=True):
            text = chunk.decode(errors="replace")
            log.write(text)
            log.flush()
            if echo is not None:
                echo.write(text)
                echo.flush()


def _writable_by_image_user(folder: Path, results_root: Path) -> None:
    """As root on the host, hand the row's folders to the image's user; as anyone else, the container
    runs as that user instead (see run_recipe)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.getuid() != 0:
        return
    for path in [folder, *folder.relative_to(results_root).parents]:
        target = results_root / path if path != folder else folder
        os.chown(target, IMAGE_USER_ID, IMAGE_USER_ID)


def run_recipe(image: str, row: Row, results_root: Path, timeout_s: float | None, *, gpus: bool | None = None, mem_limit: str | None = None, network: str = "host",
               echo=sys.stderr, recipes_dir: Path | None = None) -> int:
    """One row in a container: GPUs requested (unless the image is the cpu flavour), results folder (and
    optionally recipes) mounted, NCCL's and pinned memory's limits lifted. Returns the run's exit code
    (0 ok, 1 error, 3 oom)."""
    import docker
    from docker.types import DeviceRequest, Ulimit

    connection = client()
    if gpus is None:
        gpus = image_flavour(connection, image) != "cpu"
    if gpus and not has_gpu_runtime(connection):
        raise DockerUnavailable("the Docker daemon has no NVIDIA runtime: install the NVIDIA Container Toolkit "
                                "and restart the daemon, or run without --docker")
    recipe, probe = row.recipe, row.probe
    results_root = results_root.resolve()
    folder = row.folder.resolve()  # the row's stack is in it: the container names the same folder
    _writable_by_image_user(folder, results_root)
    (folder / RESULTS_FILE).unlink(missing_ok=True)
    command = ["shardkit", "run", recipe.name, "--runner", "native", "--results", "/results",
               *(["--probe", str(probe)] if probe else []), *row.overrides]
    environment = {"SHARDKIT_IMAGE_DIGEST": image_digest(connection, image), "SHARDKIT_RUN_ID": recipe.name}
    for name in ("HF_TOKEN", "NNODES", "NODE_RANK", "RDZV_ENDPOINT"):  # secrets reach the run, never the image
        if os.environ.get(name):
            environment[name] = os.environ[name]
    if not gpus:
        environment["DS_ACCELERATOR"] = "cpu"
    volumes = {str(results_root): {"bind": "/results", "mode": "rw"}}
    if recipes_dir is not None:
        volumes[str(recipes_dir.resolve())] = {"bind": "/opt/shardkit/recipes", "mode": "ro"}
    options = dict(command=command, environment=environment, volumes=volumes, network_mode=network,
                   mem_limit=mem_limit, labels={"shardkit.recipe": recipe.name})
    if network == "none":
        # torchrun's rendezvous advertises the hostname, which resolves in no network but as localhost.
        options["hostname"] = "localhost"
    if os.getuid() != 0:
        options.update(user=f"{os.getuid()}:{os.getgid()}", environment={**environment, "HOME": "/tmp"})
    if gpus:
        # NCCL needs the host's IPC namespace (or a large /dev/shm) between ranks; offload pins its buffers,
        # which the default memlock limit forbids (without a GPU nothing is pinned, so CPU runs keep it).
        options.update(ipc_mode="host", device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])],
                       ulimits=[Ulimit(name="memlock", soft=-1, hard=-1)])
    else:
        options.update(shm_size="1g")
    container = None
    try:
        # Created, then started: a container that fails to start is still removed below.
        container = connection.containers.create(image, **options)
        try:
            container.start()
        except docker.errors.APIError as error:
            if "could not select device driver" in str(error):
                raise DockerUnavailable("the Docker daemon cannot give containers GPUs (no NVIDIA runtime)") from None
            raise
        streamer = threading.Thread(target=_stream_logs, args=(container, folder / "container.log", echo),
                                    daemon=True)
        streamer.start()
        try:
            code = container.wait(timeout=timeout_s)["StatusCode"]
        except Exception as error:  # requests' ReadTimeout: the row outlived its limit
            if "timed out" not in str(error).lower() and "timeout" not in type(error).__name__.lower():
                raise
            container.kill()
            code = None
        container.reload()
        oom_killed = container.attrs["State"].get("OOMKilled", False)
        streamer.join(timeout=10)
        return _classify_exit(row, folder, code, oom_killed, timeout_s)
    finally:
        if container is not None:
            container.remove(force=True)  # kills it first if it still runs


def _classify_exit(row: Row, folder: Path, code: int | None, oom_killed: bool, timeout_s) -> int:
    """The container's ending as a result: the run's own results when it wrote them (ok, a CUDA OOM,
    an error), else written here from the exit code (the kernel's OOM kill, a timeout, a crash)."""
    if (folder / RESULTS_FILE).is_file():
        recorded = read_json(folder / RESULTS_FILE)
        if not oom_killed or recorded["status"] in ("ok", "oom"):
            return recorded["exit_code"]
        # The kernel killed a process of the container for its memory limit: whatever the ranks recorded
        # after it (a peer gone, their launcher gone), the cause is that kill; their steps are kept.
    if oom_killed:
        failure = Failure(kind="oom", device="host", message="container killed by the kernel's OOM killer "
                                                             "(its memory limit)")
    elif code is None:
        failure = Failure(kind="timeout", message=f"timed out after {timeout_s:g} s (row time limit)")
    elif code == 137:
        failure = Failure(kind="error", message="container killed (SIGKILL) without results")
    else:
        failure = Failure(kind="error", message=f"container exited with code {code} without results")
    failure.container_exit_code = code
    return record_failure(row, failure)
