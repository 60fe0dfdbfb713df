"""DeepSpeed's JIT-compiled ops, built once per machine and reused by every environment that matches.

torch's extension builder keys a build by a folder and lets ninja decide: a fresh virtual environment (nox
recreates one per session) has DeepSpeed's sources at another path and with newer file times, so it
recompiled every op inside the ranks' measured start-up, silently. Here a build is keyed by what makes
the binary: DeepSpeed's and torch's versions, CUDA's, the Python ABI, the compiler, the CPU (the CPU ops
are built with -march=native), the flags, and the content of the sources and headers, never their paths or
times. The launcher builds what is missing before the ranks start and before the run's clock starts,
under a lock the kernel releases if the build is killed, and says why it builds; the ranks load the cached
binaries it names and never compile.

    ~/.cache/shardkit/deepspeed_ops/<key>/<op>.so     the binary (copied in whole when the build succeeds)
    ~/.cache/shardkit/deepspeed_ops/<key>/<op>.json   what the key was made of, to explain the next build
    ~/.cache/shardkit/deepspeed_ops/build/<key>/      torch's build folder while it compiles
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

from ..results.files import write_json_atomic

if TYPE_CHECKING:
    from ..spec.resolve import ResolvedRun

# The launcher names the cached binaries here for its ranks: "op=path" pairs separated by os.pathsep.
PRELOAD_ENV = "SHARDKIT_DEEPSPEED_OPS"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shardkit" / "deepspeed_ops"


def op_names(offload: bool) -> list[str]:
    """The ops a ZeRO-3 run loads: its optimizer (CPU Adam with offload, fused Adam without) and, on CPU
    ranks, DeepSpeed's shared-memory collectives."""
    from deepspeed.accelerator import get_accelerator

    names = ["CPUAdamBuilder" if offload else "FusedAdamBuilder"]
    if get_accelerator().device_name() == "cpu":
        names.append("ShareMemCommBuilder")
    return names


def prebuild(run: ResolvedRun) -> None:
    """Builds what the run's ranks will load and names it for them; a no-op for FSDP."""
    if run.plan.parallelism.kind == "zero3":
        build_ops(op_names(run.plan.parallelism.offload))


def _version(command: list[str], line: int = 0) -> str:
    """One line of what a tool prints of its version (gcc's first, nvcc's last)."""
    try:
        out = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[line] if lines else "not found"


_CPU_INFO: dict = {}


@contextlib.contextmanager
def _cpu_info_once():
    """DeepSpeed's CPU builders ask py-cpuinfo (a second a call, in a subprocess) twice per builder for
    flags: one answer serves every builder of this process."""
    try:
        import cpuinfo
    except ImportError:
        yield
        return
    original = cpuinfo.get_cpu_info

    def cached() -> dict:
        if not _CPU_INFO:
            _CPU_INFO.update(original())
        return dict(_CPU_INFO)

    cpuinfo.get_cpu_info = cached
    try:
        yield
    finally:
        cpuinfo.get_cpu_info = original


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _digest_of_files(files: list[Path], relative_to: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(set(files)):
        name = str(path.relative_to(relative_to)) if path.is_relative_to(relative_to) else str(path)
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _without_paths(args: list[str], tree: Path) -> list[str]:
    """Flags with the environment's own paths taken out: two environments with the same DeepSpeed name
    the same include folder at different places."""
    return [a.replace(str(tree), "<deepspeed>").replace(sys.prefix, "<prefix>") for a in args]


def key_fields(builder) -> dict:
    """What the op's binary depends on, each field readable (the announcement of a build names the ones
    that differ from the nearest cached build)."""
    import deepspeed
    import torch
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    tree = Path(builder.deepspeed_src_path("")).resolve()  # what the builder's relative paths start from
    sources = [Path(builder.deepspeed_src_path(p)).resolve() for p in builder.strip_empty_entries(builder.sources())]
    includes = [Path(builder.deepspeed_src_path(p)).resolve()
                for p in builder.strip_empty_entries(builder.include_paths())]
    files = [*sources, *(f for s in sources for f in s.parent.iterdir() if f.is_file()),
             *(f for i in includes if i.is_dir() for f in i.rglob("*") if f.is_file())]
    # As DeepSpeed's jit_load decides: a CUDA op is built for the CPU where torch sees no GPU.
    cuda_build = isinstance(builder, CUDAOpBuilder) and torch.cuda.is_available()
    compiler = os.environ.get("CXX", "c++")
    with _cpu_info_once():
        flags = [*builder.strip_empty_entries(builder.cxx_args()), *builder.strip_empty_entries(builder.extra_ldflags())]
    fields = {
        "deepspeed": deepspeed.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": f"{sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')}",
        "compiler": f"{compiler}: {_version([compiler])}",
        "cpu": _cpu_model(),
        "flags": _without_paths(flags, tree),
        "sources": _digest_of_files(files, tree),
    }
    if cuda_build:
        from torch.utils.cpp_extension import CUDA_HOME

        fields["nvcc"] = _version([str(Path(CUDA_HOME or "/usr/local/cuda") / "bin" / "nvcc")], -1)
        fields["nvcc_flags"] = _without_paths(builder.strip_empty_entries(builder.nvcc_args()), tree)
        fields["arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
    return fields


def key_of(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def why_build(name: str, fields: dict, root: Path) -> str:
    """Why the op is compiled: none built on this machine, or what differs from its nearest cached build."""
    nearest: list[str] | None = None
    for manifest in root.glob(f"*/{name}.json"):
        try:
            cached = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        differ = sorted(k for k in set(fields) | set(cached) if fields.get(k) != cached.get(k))
        if nearest is None or len(differ) < len(nearest):
            nearest = differ
    if nearest is None:
        return "none built on this machine yet"
    return "a cached build differs in " + ", ".join(nearest) if nearest else "its cached binary is missing"


def _installed(builder) -> bool:
    """Built when DeepSpeed was installed (the CUDA images build theirs with DS_BUILD_*): nothing to do."""
    from deepspeed import git_version_info
    from deepspeed.accelerator import get_accelerator

    built_for = getattr(git_version_info, "accelerator_name", get_accelerator()._name)
    return bool(git_version_info.installed_ops.get(builder.name, False)) and built_for == get_accelerator()._name


def _compile(builder, build: Path) -> Path:
    """torch's JIT build of the op in ``build``; the binary it made."""
    saved = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(build)
    try:
        # Holding our lock, no shardkit build is running: torch's lock left here is a killed build's.
        (build / builder.name / "lock").unlink(missing_ok=True)
        builder.jit_load(verbose=False)
    finally:
        if saved is None:
            os.environ.pop("TORCH_EXTENSIONS_DIR", None)
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = saved
    return next((build / builder.name).glob(f"{builder.name}*.so"))


def build_ops(names: list[str]) -> dict[str, Path]:
    """The cached binary of each op (built first where none matches), also named in the environment the
    ranks inherit. An op that cannot be built is left to the ranks, which report its error as the run's."""
    from deepspeed.accelerator import get_accelerator

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    binaries: dict[str, Path] = {}
    with open(root / "build.lock", "w") as lock, _cpu_info_once():
        fcntl.flock(lock, fcntl.LOCK_EX)  # another launcher building: wait for it, then use what it built
        for builder in map(get_accelerator().create_op_builder, names):
            if builder is None or not builder.is_compatible(verbose=False) or _installed(builder):
                continue
            try:
                fields = key_fields(builder)
                key = key_of(fields)
                binary = root / key / f"{builder.name}.so"
                if not binary.exists():
                    print(f"shardkit: compiling DeepSpeed's {builder.name} op ({why_build(builder.name, fields, root)}; "
                          "once per machine for these versions and sources, not part of the run's time)",
                          file=sys.stderr, flush=True)
                    built = _compile(builder, root / "build" / key)
                    binary.parent.mkdir(exist_ok=True)
                    partial = binary.with_suffix(".so.partial")
                    shutil.copyfile(built, partial)
                    partial.replace(binary)
                    write_json_atomic(root / key / f"{builder.name}.json", fields)
                    shutil.rmtree(root / "build" / key, ignore_errors=True)
                binaries[builder.name] = binary
            except Exception as error:
                print(f"shardkit: building {builder.name} failed ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); the ranks will try again",
                      file=sys.stderr, flush=True)
    if binaries:
        os.environ[PRELOAD_ENV] = os.pathsep.join(f"{name}={path}" for name, path in binaries.items())
    return binaries


def preload() -> None:
    """In a rank: loads the binaries its launcher named and hands them to DeepSpeed's op registry, so
    that DeepSpeed's own ``load()`` returns them instead of compiling."""
    named = os.environ.get(PRELOAD_ENV)
    if not named:
        return
    import importlib.util

    import torch  # noqa: F401  (the binaries link against the libtorch it loads)

    try:
        from deepspeed.ops.op_builder.builder import OpBuilder
    except ImportError:
        return
    loaded = getattr(OpBuilder, "_loaded_ops", None)
    if loaded is None:  # a DeepSpeed without the registry: it loads (and builds) its own
        return
    for pair in named.split(os.pathsep):
        name, path = pair.split("=", 1)
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[name] = module


def init_distributed() -> None:
    """deepspeed.init_distributed() with the ops preloaded, without the line DeepSpeed's CPU backend prints
    on every rank each time it loads its shared-memory op ("... built successfully", even when it built
    nothing)."""
    import contextlib
    import io

    import deepspeed

    preload()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        deepspeed.init_distributed()
    for line in printed.getvalue().splitlines():
        if not line.endswith("built successfully"):
            print(line)
