"""The machines the time model runs on: GPU cards, the host they sit in, and the link between GPUs.

Every rate is a datasheet figure or a measurement, with its source beside it; none is fitted to the table.
The table's machine is not named by the seed: it is taken to be NVIDIA's reference system for the A100 80GB,
a DGX A100 (8 A100 SXM 80GB on NVSwitch, two AMD EPYC 7742), the stated assumption behind every time the
planner predicts for it (docs/planner.md)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from ..errors import UsageError

Link = Literal["nvlink", "pcie"]
LINKS: tuple[Link, ...] = ("nvlink", "pcie")


@dataclass(frozen=True)
class Card:
    name: str
    matmul_flops: float
    """Achievable dense bf16 matmul rate, FLOP/s: measured, or derived from a measurement (its source says how)."""
    matmul_source: str
    hbm_bytes_per_s: float
    """Memory bandwidth (datasheet): the rate of every memory-bound kernel."""
    nvlink_bytes_per_s: float | None
    """NVLink bandwidth per direction (datasheet total / 2): what a ring collective moves per GPU per second;
    None where the node's GPUs have no NVLink among all of them (collectives then run over PCIe)."""
    pcie_bytes_per_s: float
    """Host link per direction (datasheet total / 2)."""
    source: str
    device_names: tuple[str, ...]
    """Regular expressions matched against torch.cuda.get_device_name() that mean this card."""
    memory_bytes: int = 80 * 2**30
    """The datasheet's memory, its GB read as GiB as nvidia-smi counts it."""
    key: str = ""
    aliases: tuple[str, ...] = ()
    peak_bf16_flops: float = 0.0
    """The datasheet's dense bf16 peak."""


CARDS_FILE = Path(__file__).parent / "data" / "cards.json"


def _load_cards() -> dict[str, Card]:
    """The card catalogue (data/cards.json, each entry with its datasheet); a card with no matmul
    measurement takes the measured fraction of its datasheet peak from the card it names."""
    entries = json.loads(CARDS_FILE.read_text())["cards"]

    def matmul(key: str) -> tuple[float, str]:
        e = entries[key]
        m = e["matmul"]
        if "measured_tflops" in m:
            return m["measured_tflops"] * 1e12, m["source"]
        base_rate, base_source = matmul(m["fraction_of"])
        fraction = base_rate / (entries[m["fraction_of"]]["peak_bf16_tflops"] * 1e12)
        return (fraction * e["peak_bf16_tflops"] * 1e12,
                f"{fraction:.1%} of the datasheet's {e['peak_bf16_tflops']:g} TFLOP/s, the measured fraction of "
                f"the {entries[m['fraction_of']]['name']} ({m['why']}; that card: {base_source})")

    cards = {}
    for key, e in entries.items():
        rate, rate_source = matmul(key)
        nvlink = e["nvlink_gb_s"] * 1e9 / 2 if e["nvlink_gb_s"] else None
        cards[key] = Card(e["name"], rate, rate_source, e["memory_gb_s"] * 1e9, nvlink, e["pcie_gb_s"] * 1e9 / 2,
                          e["source"], tuple(e["device_names"]), int(e["memory_gb"] * 2**30), key,
                          tuple(e.get("aliases", ())), e["peak_bf16_tflops"] * 1e12)
    return cards


CATALOGUE: dict[str, Card] = _load_cards()
CARDS: dict[str, Card] = {**{alias: c for c in CATALOGUE.values() for alias in c.aliases}, **CATALOGUE}
"""Every card by its key and its aliases (a100 is the A100 SXM 80GB, the table's; h100, h200 likewise)."""


def _normal(name: str) -> str:
    return re.sub(r"[\s_-]+", "-", name.strip().lower()).removeprefix("nvidia-")


def card_for(name: str) -> Card:
    """--gpu NAME: a key, an alias or a card's name, forgiving of case, spaces and dashes; one line for any other."""
    wanted = _normal(name)
    for key, card in CARDS.items():
        if wanted in (_normal(key), _normal(card.name)):
            return card
    raise UsageError(f"--gpu {name!r}: not a card the planner knows; known: {', '.join(CATALOGUE)} "
                     f"(and {', '.join(a for c in CATALOGUE.values() for a in c.aliases)})")


@dataclass(frozen=True)
class Host:
    name: str
    cores: int
    memory_bytes_per_s: float
    """Peak DRAM bandwidth of the node (all sockets)."""
    gpus_per_pcie_uplink: int
    """GPUs behind one PCIe switch uplink to the CPU: they share its bandwidth when all transfer at once."""
    source: str


DGX_A100 = Host(
    "DGX A100 (2 x AMD EPYC 7742)", 128, 409.6e9, 2,
    "NVIDIA DGX A100 datasheet: dual AMD EPYC 7742, 128 cores; AMD EPYC 7742: 8 channels DDR4-3200, "
    "204.8 GB/s per socket; DGX A100 system architecture: four PCIe Gen4 switches, two GPUs each")


@dataclass(frozen=True)
class Hardware:
    """A node of ``card`` GPUs in ``host``, collectives over ``link``."""

    card: Card
    host: Host = DGX_A100
    link: Link = "nvlink"
    measured_matmul_flops: float | None = None
    """A run's own measured bf16 matmul rate: replaces the card's when given."""

    @property
    def matmul_flops(self) -> float:
        return self.measured_matmul_flops or self.card.matmul_flops

    @property
    def matmul_source(self) -> str:
        return "the run's own measured bf16 matmul rate" if self.measured_matmul_flops else self.card.matmul_source

    @property
    def collective_bytes_per_s(self) -> float:
        """Per-GPU bus bandwidth of a ring collective: NVLink, or the PCIe link when GPUs talk through it."""
        if self.link == "nvlink" and self.card.nvlink_bytes_per_s:
            return self.card.nvlink_bytes_per_s
        return self.card.pcie_bytes_per_s

    def host_link_bytes_per_s(self, gpus: int) -> float:
        """What one GPU's host transfers get per direction while every rank transfers at once."""
        return self.card.pcie_bytes_per_s / min(gpus, self.host.gpus_per_pcie_uplink)

    def host_thread_bytes_per_s(self, threads: int) -> float:
        """What ``threads`` CPU threads stream: their cores' share of the host's memory bandwidth (the stated
        assumption: a lone thread on an idle host can stream more, so CPU-bound terms are upper bounds)."""
        return self.host.memory_bytes_per_s * min(threads, self.host.cores) / self.host.cores

    def with_link(self, link: Link) -> Hardware:
        return replace(self, link=link)


REFERENCE = Hardware(CARDS["a100"])
"""The table's machine (assumed): A100 SXM 80GB cards in a DGX A100, collectives over NVLink."""


def card_named(device_name: str | None) -> Card | None:
    """The card whose name torch reports, or None for a card the catalogue does not hold."""
    for card in CATALOGUE.values():
        if device_name and any(re.search(pattern, device_name) for pattern in card.device_names):
            return card
    return None


def hardware_for(device_name: str | None, measured_matmul_flops: float | None = None) -> Hardware | None:
    """The hardware a run reports (its card, its measured matmul rate), in the reference host; None when the
    card is unknown and nothing was measured."""
    card = card_named(device_name)
    if card is None:
        return None
    return Hardware(card, measured_matmul_flops=measured_matmul_flops)
