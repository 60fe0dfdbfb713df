"""The cheap checks of a run's data source, made before any process starts (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from .paths import read_text


def read_records(path: Path) -> list[dict]:
    """The instruction records of a JSON list or a JSONL file, each with a "prompt" and a "response" string."""
    text = read_text(path)
    if path.suffix == ".jsonl":
        records, lines = [], []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise UsageError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
                lines.append(line_number)
        _check_records(records, [f"{path}:{number}" for number in lines])
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}:{error.lineno}:{error.colno}: not valid JSON ({error.msg})") from None
    if not isinstance(records, list):
        raise UsageError(f"{path}: expected a JSON list of {{\"prompt\", \"response\"}} records")
    _check_records(records, [f"{path}: record {index}" for index in range(1, len(records) + 1)])
    return records


def _check_records(records: list, places: list[str]) -> None:
    for record, place in zip(records, places, strict=True):
        if not isinstance(record, dict):
            raise UsageError(f"{place}: expected an object with \"prompt\" and \"response\", got {type(record).__name__}")
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                found = "missing" if key not in record else f"a {type(record[key]).__name__}, not text"
                raise UsageError(f"{place}: \"{key}\" is {found} (keys: {', '.join(map(repr, record)) or 'none'})")


def check_data_source(cfg) -> None:
    """The cheap part of the data checks, for before any process starts."""
    if cfg.data_path and not Path(cfg.data_path).is_file():
        raise UsageError(f"--data_path {cfg.data_path!r}: no such file")
    if cfg.data_path and not (cfg.tokenizer_path or Path(cfg.model_name_or_path).is_dir()):
        raise UsageError("--data_path needs --tokenizer_path (a local tokenizer folder): presets have no tokenizer")
    if cfg.data_path and cfg.tokenizer_path and not Path(cfg.tokenizer_path).is_dir():
        raise UsageError(f"--tokenizer_path {cfg.tokenizer_path!r}: no such folder")
