"""The machines the time model runs on: GPU cards, the host they sit in, and the link between GPUs.

Every rate is a datasheet figure or a measurement, with its source beside it; none is fitted to the table.
The table's machine is not named by the seed: it is taken to be NVIDIA's reference system for the A100 80GB,
a DGX A100 (8 A100 SXM 80GB on NVSwitch, two AMD EPYC 7742), the stated assumption behind every time the
planner predicts for it (docs/planner.md)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Link = Literal["nvlink", "pcie"]
LINKS: tuple[Link, ...] = ("nvlink", "pcie")


@dataclass(frozen=True)
class Card:
    name: str
    matmul_flops: float
    """Achievable dense bf16 matmul rate, FLOP/s: measured, not the datasheet peak."""
    matmul_source: str
    hbm_bytes_per_s: float
    """Memory bandwidth (datasheet): the rate of every memory-bound kernel."""
    nvlink_bytes_per_s: float
    """NVLink bandwidth per direction (datasheet total / 2): what a ring collective moves per GPU per second."""
    pcie_bytes_per_s: float
    """Host link per direction (datasheet total / 2)."""
    source: str
    device_names: tuple[str, ...]
    """Substrings of torch.cuda.get_device_name() that mean this card."""


CARDS: dict[str, Card] = {
    "a100": Card(
        "A100 SXM 80GB", 271.2e12,
        "S. Bekman, 'Machine Learning Engineering', Maximum Achievable Matmul FLOPS table: 271.2 of 312 TFLOP/s "
        "on an A100 SXM (mamf-finder, torch 2.6)",
        2039e9, 300e9, 32e9,
        "NVIDIA A100 datasheet (2021), 80GB SXM: HBM2e 2,039 GB/s, NVLink 600 GB/s, PCIe Gen4 64 GB/s",
        ("A100",)),
    "h100": Card(
        "H100 SXM 80GB", 783.5e12,
        "measured on an H100 80GB: a bf16 8192^3 matmul ran at 780-787 TFLOP/s (midpoint; datasheet 989)",
        3350e9, 450e9, 64e9,
        "NVIDIA H100 datasheet (2023), SXM: HBM3 3.35 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s",
        ("H100",)),
    "h200": Card(
        "H200 SXM 141GB", 783.5e12,
        "the H100's measured rate: the H200 has the same GH100 die and the same 989 TFLOP/s datasheet peak; "
        "a run on it measures its own (matmul_bf16_flops)",
        4800e9, 450e9, 64e9,
        "NVIDIA H200 datasheet (2024), SXM: HBM3e 4.8 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s",
        ("H200",)),
}


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
        return self.card.nvlink_bytes_per_s if self.link == "nvlink" else self.card.pcie_bytes_per_s

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
    """The card whose name torch reports, or None for a card the table does not hold."""
    for card in CARDS.values():
        if device_name and any(pattern in device_name for pattern in card.device_names):
            return card
    return None


def hardware_for(device_name: str | None, measured_matmul_flops: float | None = None) -> Hardware | None:
    """The hardware a run reports (its card, its measured matmul rate), in the reference host; None when the
    card is unknown and nothing was measured."""
    card = card_named(device_name)
    if card is None:
        return None
    return Hardware(card, measured_matmul_flops=measured_matmul_flops)
