"""Load raw rows with `datasets`: registered datasets (built-in or plugins'), local files, or the hub."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import List

from llmexp.config.schema import DataConfig
from llmexp.errors import UserError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_raw(cfg: DataConfig):
    """The configured split as a `datasets.Dataset` (plus a validation split when named)."""
    if cfg.source == "bundled":
        return _bundled(cfg), None
    if cfg.source == "files":
        return _files(cfg), None
    return _hub(cfg)


def _bundled(cfg: DataConfig):
    """Rows of a dataset registered through the ``llmexp_datasets`` hook (llmexp's or a plugin's)."""
    import dataclasses

    from datasets import Dataset

    from llmexp.plugins.registry import lookup

    entry = lookup("llmexp_datasets", cfg.name, "data.name")
    decl = entry.declaration
    names = {f.name for f in dataclasses.fields(decl.options)} if decl.options else set()
    unknown = set(cfg.options) - names
    if unknown:
        raise UserError(f"data.options: unknown option(s) {sorted(unknown)} for dataset "
                        f"{cfg.name!r}; valid: {', '.join(sorted(names)) or 'none'}")
    options = decl.options(**cfg.options) if decl.options else None
    try:
        rows = decl.builder(options, cfg.seed)
        ds = rows if isinstance(rows, Dataset) else Dataset.from_list([dict(r) for r in rows])
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the plugin's bug: name it (LLMEXP_TRACEBACK=1 shows where)
        raise UserError(f"data.name: dataset {cfg.name!r} of {entry.owner} failed to build: "
                        f"{type(e).__name__}: {e}") from e
    if len(ds) == 0:
        raise UserError(f"data.options: dataset {cfg.name!r} built no rows with options {cfg.options}")
    return ds


def data_files(path: str) -> List[str]:
    p = Path(os.path.expanduser(path))
    found = sorted(str(f) for f in p.rglob("*") if f.suffix in FILE_BUILDERS) if p.is_dir() \
        else sorted(glob.glob(os.path.expanduser(path)))
    if not found:
        raise UserError(f"data.path: no JSONL/JSON/Parquet/CSV file at {path!r}")
    kinds = {FILE_BUILDERS.get(Path(f).suffix) for f in found}
    if None in kinds or len(kinds) > 1:
        raise UserError(f"data.path: {path!r} must name files of one kind among "
                        f"{', '.join(FILE_BUILDERS)}; found {sorted({Path(f).suffix for f in found})}")
    return found


def _check_json_lines(files: List[str]) -> None:
    """Report the first malformed line with its file and number (datasets does not say which)."""
    for f in files:
        if os.path.getsize(f) == 0:
            raise UserError(f"data.path: {f} is empty")
        if not f.endswith(".jsonl"):
            continue
        with open(f, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"data.path: {f} line {n} is not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                    f"{e.start + 1}); re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"data.path: {f} line {n} is not valid JSON ({e.msg}); fix or remove that line") from None
                    if not isinstance(row, dict):
                        raise UserError(f"data.path: {f} line {n} is not a JSON object")


def _files(cfg: DataConfig):
    from datasets import load_dataset

    files = data_files(cfg.path)
    _check_json_lines(files)
    builder = FILE_BUILDERS[Path(files[0]).suffix]
    try:
        ds = load_dataset(builder, data_files=files, split="train", **cfg.options)
    except Exception as e:  # datasets raises many kinds here; all mean the files are unreadable
        raise UserError(f"data.path: cannot read {cfg.path!r} as {builder}: {str(e).splitlines()[0]}") from None
    if len(ds) == 0:
        raise UserError(f"data.path: {cfg.path!r} holds no rows")
    return ds


def _hub(cfg: DataConfig):
    from datasets import load_dataset, load_from_disk

    local = Path(os.path.expanduser(cfg.path))
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            loaded = load_from_disk(str(local))
            train = loaded[cfg.split] if hasattr(loaded, "keys") else loaded
            val = loaded[cfg.validation_split] if cfg.validation_split else None
            return train, val
        train = load_dataset(cfg.path, split=cfg.split, **cfg.options)
        val = load_dataset(cfg.path, split=cfg.validation_split, **cfg.options) if cfg.validation_split else None
    except (KeyError, ValueError, FileNotFoundError, ConnectionError) as e:
        raise UserError(f"data.path: cannot load {cfg.path!r} (split {cfg.split!r}): {str(e).splitlines()[0]}") from None
    return train, val
