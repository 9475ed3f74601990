"""The column names of a data source, read cheaply (no `datasets` import) for validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from llmexp.config.schema import DataConfig


def peek_columns(cfg: DataConfig) -> Optional[List[str]]:
    """Columns of the first row of the source, or None when they cannot be known cheaply
    (hub datasets; unreadable files are reported with details when the run loads them)."""
    if cfg.source == "bundled":
        from llmexp.plugins.registry import datasets

        entry = datasets().get(cfg.name)  # the columns a built-in or plugin dataset declares
        return list(entry.declaration.columns) if entry and entry.declaration.columns else None
    if cfg.source != "files" or not cfg.path:
        return None
    try:
        from llmexp.data.sources import data_files

        first = data_files(cfg.path)[0]
        return _columns_of(Path(first))
    except Exception:  # noqa: BLE001 - the loader reports the precise problem later
        return None


def peek_row(cfg: DataConfig) -> Optional[Dict[str, Any]]:
    """The first row of a JSONL data file (what its values are, for messages about its columns), else None."""
    if cfg.source != "files" or not cfg.path:
        return None
    try:
        from llmexp.data.sources import _data_suffix, data_files

        first = Path(data_files(cfg.path)[0])
        return _first_jsonl_row(first) if _data_suffix(first) == ".jsonl" else None
    except Exception:  # noqa: BLE001 - the loader reports the precise problem later
        return None


def _first_jsonl_row(path: Path) -> Optional[Dict[str, Any]]:
    from llmexp.data.sources import open_binary

    with open_binary(str(path)) as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                return row if isinstance(row, dict) else None
    return None


def _columns_of(path: Path) -> Optional[List[str]]:
    from llmexp.data.sources import TEXT_SUFFIXES, _data_suffix

    suffix = _data_suffix(path)
    if suffix in TEXT_SUFFIXES:
        return ["text"]
    if suffix == ".jsonl":
        row = _first_jsonl_row(path)
        return list(row.keys()) if row is not None else None
    if suffix != path.suffix:  # other compressed kinds: known once loaded
        return None
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return list(data[0].keys())
        if isinstance(data, dict):
            return list(data.keys())
        return None
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), None)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return None
