"""``python -m shardkit.train`` and ``recipes/finetune_llama.py``: the seed's command line, run as written.

Under torchrun this process is one rank. Started directly, it is the launcher: it starts
``--nproc_per_node`` ranks itself. Either way, bad input is one line on stderr before any process group."""

from __future__ import annotations

import os
import sys

from .args import parse_args
from .errors import EXIT_USAGE, UsageError


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg, options = parse_args(argv)
        if cfg.fake_world:
            if (options.nproc_per_node or 1) not in (1, cfg.fake_world) or options.nnodes > 1:
                raise UsageError(f"--fake_world {cfg.fake_world} runs one process standing for {cfg.fake_world} "
                                 f"ranks; --nproc_per_node {options.nproc_per_node} / --nnodes {options.nnodes} "
                                 "contradict it")
            world = cfg.fake_world
        elif _under_torchrun():
            world = int(os.environ.get("WORLD_SIZE", 1))
        else:
            world = (options.nproc_per_node or 1) * options.nnodes
        from .models import build_on_meta, parameter_counts
        from .plan import describe, resolve

        plan = resolve(cfg, world)
        plan.parameters = parameter_counts(build_on_meta(plan.model, cfg.attn_implementation))
    except UsageError as error:
        if rank == 0:
            print(f"shardkit: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if cfg.dry_run:
        if rank == 0:
            print(describe(plan, cfg))
        return 0
    if cfg.fake_world:
        return _run_fake_world(cfg, plan)
    if not _under_torchrun():
        from .launch import launch

        return launch(argv, options, cfg, plan)
    from .worker import run

    return run(cfg, plan)


def _run_fake_world(cfg, plan) -> int:
    """The one process is rank 0 of ``--fake_world`` ranks; the launcher's wall time is its own."""
    import time

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(cfg.fake_world),
                      SHARDKIT_LAUNCH_TIME=os.environ.get("SHARDKIT_LAUNCH_TIME") or repr(time.time()))
    from .worker import run

    return run(cfg, plan)


if __name__ == "__main__":
    sys.exit(main())
