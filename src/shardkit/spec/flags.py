"""Seed-style command lines (``--flag value``, HF booleans) -> ``TrainConfig``, or a one-line ``UsageError``.

The flags are generated from the config's fields, so the parser, ``--help`` and the saved configuration
cannot drift apart.
"""

from __future__ import annotations

import argparse
import types
import typing

from ..errors import ArgumentParser, UsageError
from .config import FLAG_ALIASES, TrainConfig, field_help
from .resolve import Launch
from .typed import ValidationError, field_annotations, problems

# Launcher flags: how many processes to start when not already under torchrun. Not part of the training
# configuration; they become the resolved run's Launch.
LAUNCH_FLAGS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint")


def _is_bool(annotation) -> bool:
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return annotation is bool or (is_union and bool in typing.get_args(annotation))


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="shardkit.train", description="Fine-tune a LLaMA model and measure it.",
                     allow_abbrev=False, add_help=True)
    helps = field_help()
    for name, annotation in field_annotations(TrainConfig).items():
        flags = [f"--{name}"] + [f"--{old}" for old, new in FLAG_ALIASES.items() if new == name]
        if _is_bool(annotation):
            # HF style: "--bf16 True", "--bf16 false" or a bare "--bf16".
            parser.add_argument(*flags, dest=name, nargs="?", const="true", default=None, help=helps[name])
        else:
            parser.add_argument(*flags, dest=name, default=None, help=helps[name])
    launch = parser.add_argument_group("launcher (only when not started by torchrun)")
    launch.add_argument("--nproc_per_node", type=int, default=1, help="Processes to start on this node.")
    launch.add_argument("--nnodes", type=int, default=1, help="Nodes taking part (c10d rendezvous).")
    launch.add_argument("--node_rank", type=int, default=0, help="This node's rank (informational).")
    launch.add_argument("--rdzv_endpoint", default=None, help="host:port of the c10d rendezvous.")
    return parser


def _one_line(error: ValidationError, values: dict) -> str:
    first = problems(error, values)[0]
    if not first["loc"]:  # a model-level validator: its message names the flags itself
        return first["msg"]
    return f"--{first['loc'][0]} {first['input']!r}: {first['msg']}"


def make_config(values: dict) -> TrainConfig:
    """Validate a mapping of field values (from flags or a recipe); errors become one-line UsageErrors."""
    try:
        return TrainConfig(**values)
    except ValidationError as error:
        raise UsageError(_one_line(error, values)) from None


def typed_fields(argv: list[str] | None) -> set[str]:
    """The configuration fields a command line (or a recipe's overrides; None: this process's) sets."""
    namespace, _ = build_parser().parse_known_args(argv)
    return {k for k, v in vars(namespace).items() if v is not None and k not in LAUNCH_FLAGS}


def parse_args(argv: list[str]) -> tuple[TrainConfig, Launch]:
    """Parse a seed-style command line into the run's configuration and the launcher options: the one parse
    of a command line in any process."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UsageError(f"unknown flag {unknown[0]!r} (see --help for the accepted flags)")
    values = {k: v for k, v in vars(namespace).items() if v is not None and k not in LAUNCH_FLAGS}
    return make_config(values), Launch(**{k: getattr(namespace, k) for k in LAUNCH_FLAGS})
