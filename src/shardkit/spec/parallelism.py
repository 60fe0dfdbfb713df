"""The parallel method of a run, named once: what is sharded how, and whether it is offloaded to the CPU.

Recipes, the run configuration, the planner and the results all speak of a method through this type, so
"zero3 with offload" means the same thing to the engine that runs it and to the planner that predicts it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["fsdp", "zero3"]
KINDS: tuple[Kind, ...] = ("fsdp", "zero3")
# Micro-batches per optimizer step when a recipe gives none: the seed's two command lines.
SEED_ACCUMULATION: dict[Kind, int] = {"fsdp": 8, "zero3": 2}


@dataclass(frozen=True)
class Parallelism:
    kind: Kind
    """fsdp: PyTorch FSDP, full_shard, one unit per decoder layer; zero3: DeepSpeed ZeRO stage 3."""
    offload: bool
    """Parameters, gradients and optimizer states kept on the CPU (FSDP's CPU offload, ZeRO-3's optimizer and
    parameter offload)."""

    @property
    def name(self) -> str:
        """The recipes' and results' name: fsdp, fsdp_offload, zero3, zero3_offload."""
        return f"{self.kind}_offload" if self.offload else self.kind

    @property
    def label(self) -> str:
        return f"{self.kind}{' + offload' if self.offload else ''}"

    @property
    def seed_accumulation(self) -> int:
        return SEED_ACCUMULATION[self.kind]

    @classmethod
    def from_name(cls, name: str) -> Parallelism:
        kind, _, rest = name.partition("_")
        if kind not in KINDS or rest not in ("", "offload"):
            raise ValueError(f"unknown parallel method {name!r}: one of {', '.join(NAMES)}")
        return cls(kind, rest == "offload")  # type: ignore[arg-type]


NAMES = tuple(Parallelism(kind, offload).name for kind in KINDS for offload in (False, True))


def deepspeed_offload(config: dict) -> bool:
    """Whether a DeepSpeed JSON offloads: both offload sections must name the CPU, as the seed's config does;
    one without the other is a third method the table does not have."""
    zero = config.get("zero_optimization", {})
    devices = [(zero.get(section) or {}).get("device", "none") for section in ("offload_optimizer", "offload_param")]
    offloaded = [device not in ("none", None) for device in devices]
    if offloaded[0] != offloaded[1]:
        raise ValueError("zero_optimization offloads only one of offload_optimizer and offload_param; the table's "
                         "ZeRO-3 rows offload both or neither")
    return offloaded[0]
