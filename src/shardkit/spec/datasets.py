"""The cheap checks of a run's data source, made before any process starts (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError


def read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise UsageError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None
    if not isinstance(records, list):
        raise UsageError(f"{path}: expected a JSON list of {{\"prompt\", \"response\"}} records")
    return records


def check_data_source(cfg) -> None:
    """The cheap part of the data checks, for before any process starts."""
    if cfg.data_path and not Path(cfg.data_path).is_file():
        raise UsageError(f"--data_path {cfg.data_path!r}: no such file")
    if cfg.data_path and not (cfg.tokenizer_path or Path(cfg.model_name_or_path).is_dir()):
        raise UsageError("--data_path needs --tokenizer_path (a local tokenizer folder): presets have no tokenizer")
