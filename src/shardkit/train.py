"""``python -m shardkit.train`` and ``recipes/finetune_llama.py``: the seed's command line, run as written.

The command line is parsed and resolved once, here. Under torchrun this process is one rank. Started
directly, it is the launcher: it starts ``--nproc_per_node`` ranks itself, which read the resolved run from
its ``config.json``. With ``--fake_world N`` this process is rank 0 of N. Either way, bad input is one line
on stderr before any process group."""

from __future__ import annotations

import os
import sys

from .errors import EXIT_USAGE, UsageError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    try:
        from .engine.preflight import check_engine
        from .spec.config import inert_flags
        from .spec.flags import parse_args, typed_fields
        from .spec.resolve import resolve

        cfg, launch_options = parse_args(argv)
        run = resolve(cfg, launch_options, int(os.environ.get("WORLD_SIZE", 1)) if under_torchrun else None)
        check_engine(run, for_training=not cfg.dry_run)
    except UsageError as error:
        if rank == 0:
            print(f"shardkit: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if rank == 0:
        for note in inert_flags(cfg, typed_fields(argv)):
            print(f"shardkit: note: {note}", file=sys.stderr, flush=True)
    if cfg.dry_run:
        if rank == 0:
            from .spec.resolve import dry_run_text

            print(dry_run_text(run))
        return 0
    if under_torchrun and not run.plan.fake_world:
        from .engine.rank import launch_time, run_rank

        return run_rank(run, rank, int(os.environ.get("LOCAL_RANK", 0)), launch_time(), launched_by_shardkit=False)
    from .engine.launch import launch

    try:
        return launch(run)
    except UsageError as error:  # the output folder is another run's
        print(f"shardkit: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
