"""The table's numbers as data (recipes/reference.csv) and the tiny reference loss curves
(recipes/reference_tiny.json). Provenance and unit assumptions: recipes/REFERENCE.md."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .recipes import RECIPES_DIR

# The table prints "81GB" on 80 GB cards: nvidia-smi's MiB figure read as thousands (81251 MiB -> 81GB).
BYTES_PER_TABLE_GB = 1000 * 2**20
REFERENCE_GPU = "NVIDIA A100-SXM4-80GB"  # an assumption: see REFERENCE.md
REFERENCE_GPU_MEMORY_GB = 81920 / 1000  # 80 GiB = 81,920 MiB, in the table's GB


@dataclass(frozen=True)
class ReferenceRow:
    recipe: str
    row: int
    model: str
    method: str
    grad_ckpt: bool
    batch: int
    gpus: int
    memory_printed: str
    memory_gb: float | None
    time_printed: str
    time_s: int | None
    status: str  # "ok" or "oom"

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory_gb is None else int(self.memory_gb * BYTES_PER_TABLE_GB)


def load_table(path: Path = RECIPES_DIR / "reference.csv") -> dict[str, ReferenceRow]:
    rows = {}
    with open(path, newline="") as handle:
        for number, raw in enumerate(csv.DictReader(handle), start=2):
            try:
                row = ReferenceRow(
                    recipe=raw["recipe"], row=int(raw["row"]), model=raw["model"], method=raw["method"],
                    grad_ckpt=raw["grad_ckpt"] == "True", batch=int(raw["batch"]), gpus=int(raw["gpus"]),
                    memory_printed=raw["memory_printed"],
                    memory_gb=float(raw["memory_gb"]) if raw["memory_gb"] else None,
                    time_printed=raw["time_printed"], time_s=int(raw["time_s"]) if raw["time_s"] else None,
                    status=raw["status"])
            except (KeyError, ValueError) as error:
                raise UsageError(f"{path}:{number}: malformed reference row ({error})") from None
            rows[row.recipe] = row
    return rows


def load_tiny(path: Path = RECIPES_DIR / "reference_tiny.json") -> dict:
    """{"provenance": {...}, "runs": {recipe: {"loss": [...], ...}}}"""
    if not path.is_file():
        return {"provenance": None, "runs": {}}
    return json.loads(path.read_text())
