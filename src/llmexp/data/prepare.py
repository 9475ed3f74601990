"""Config-selected preparation steps on raw rows: normalise, filter by length, dedup, split."""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from typing import Any, Callable, Dict, List, Optional, Tuple

from llmexp.config.schema import DataConfig
from llmexp.errors import UserError, counted

TEXT_FIELDS = ("text", "prompt", "completion", "messages", "chosen", "rejected", "answer")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")


def normalize_text(text: str) -> str:
    """Unicode NFC (the same characters, composed one way), line endings as newlines, control
    characters dropped (tab and newline kept); nothing else. Whitespace is content: indentation is
    code's syntax, and a completion's leading space is part of its first token (an earlier
    normalize trimmed every line, and code trained without its indentation)."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n"))


def collapse_whitespace_text(text: str) -> str:
    """Runs of spaces and tabs as one space, each line and the ends trimmed: for prose scraped
    with layout noise, never for code."""
    return "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n")).strip()


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: (_map_strings(v, fn) if k == "content" else v) for k, v in value.items()}
    return value


def content_chars(row: Dict[str, Any]) -> int:
    """Characters of the content fields of a row (message contents included)."""
    total = 0
    for f in TEXT_FIELDS:
        v = row.get(f)
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, list):  # messages; a bare string in the list counts as its text
            total += sum(len(m.get("content") or "") if isinstance(m, dict) else len(m) if isinstance(m, str) else 0
                         for m in v)
    return total


# Besides the text, what makes two rows different examples: KTO's label (the same completion marked
# good and bad are two rows; dedup removed every bad one of such a file) and a system prompt column.
KEY_FIELDS = (*TEXT_FIELDS, "label", "system")


def content_key(row: Dict[str, Any]) -> str:
    payload = json.dumps({f: row.get(f) for f in KEY_FIELDS if f in row}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


def default_num_proc(rows: int) -> int:
    """Every core for a large dataset; one process below 20k rows, where starting workers costs more."""
    return max(1, min(os.cpu_count() or 1, rows // 20_000 + 1))


def num_proc(ds, cfg: DataConfig) -> Optional[int]:
    n = cfg.num_proc or default_num_proc(len(ds))
    return n if n > 1 else None


def _map_text(ds, cfg: DataConfig, fn: Callable[[str], str], desc: str):
    """``fn`` on every string of the text fields; batched: a third of the time of one call per row
    (4,000 chats: 0.03 s against 0.1 s)."""
    cols = [c for c in TEXT_FIELDS if c in ds.column_names]
    return ds.map(lambda batch: {c: [_map_strings(v, fn) for v in batch[c]] for c in cols}, batched=True,
                  desc=desc, num_proc=num_proc(ds, cfg))


def normalize(ds, cfg: DataConfig):
    return _map_text(ds, cfg, normalize_text, "normalize")


def collapse_whitespace(ds, cfg: DataConfig):
    return _map_text(ds, cfg, collapse_whitespace_text, "collapse_whitespace")


def filter_length(ds, cfg: DataConfig):
    hi = cfg.max_chars or float("inf")
    return ds.filter(lambda row: cfg.min_chars <= content_chars(row) <= hi, desc="filter_length",
                     num_proc=num_proc(ds, cfg))


def _content_hashes(batch: Dict[str, List[Any]]) -> Dict[str, List[int]]:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    return {"_content_hash": [int(content_key(r)[:15], 16) for r in rows]}  # 60 bits: fits int64


def dedup(ds, cfg: DataConfig):
    """Keep the first row of each content: hashes computed in the parallel map, compared in numpy."""
    import numpy as np

    hashes = ds.map(_content_hashes, batched=True, num_proc=num_proc(ds, cfg), desc="dedup",
                    remove_columns=ds.column_names).with_format("numpy")[:]["_content_hash"]  # one array, not per row
    _, first = np.unique(np.asarray(hashes), return_index=True)
    return ds.select(np.sort(first)) if len(first) < len(ds) else ds


def dedup_note(log: List[Dict[str, Any]]) -> Optional[str]:
    """Said when dedup removed most of the rows (generated data of 500 rows kept 36, and validation
    measured 2 of them, without a word)."""
    entry = next((e for e in log if e.get("step") == "dedup"), None)
    if entry is None or entry["rows_out"] * 2 >= entry["rows_in"]:
        return None
    return (f"data: dedup kept {entry['rows_out']} of {entry['rows_in']} rows, the others repeating one of them "
            f"word for word; leave dedup out of data.steps to train on every row")


STEPS: Dict[str, Callable] = {"normalize": normalize, "collapse_whitespace": collapse_whitespace,
                              "filter_length": filter_length, "dedup": dedup}


def run_steps(ds, cfg: DataConfig) -> Tuple[Any, List[Dict[str, Any]]]:
    """Apply cfg.steps in order; return the dataset and a log of row counts per step."""
    log = []
    for name in cfg.steps:
        before = len(ds)
        ds = STEPS[name](ds, cfg)
        log.append({"step": name, "rows_in": before, "rows_out": len(ds)})
        if len(ds) == 0:
            raise UserError(f"data.steps: every row was removed by step {name!r} ({counted(before, 'row')} in); "
                            f"loosen data.min_chars/data.max_chars or drop the step from data.steps")
    return ds, log


def split(ds, val, cfg: DataConfig):
    """Train/validation split: the named validation split, or a seeded held-out fraction."""
    if val is None:
        if cfg.val_fraction <= 0:
            raise UserError("data.val_fraction: a validation set is needed; set data.val_fraction > 0 "
                            "or data.validation_split=<split>")
        n_val = max(1, int(round(len(ds) * cfg.val_fraction)))
        if cfg.max_val_samples:
            n_val = min(n_val, cfg.max_val_samples)
        if n_val >= len(ds):
            raise UserError(f"data: {counted(len(ds), 'row')} {'is' if len(ds) == 1 else 'are'} too few to hold out {n_val} for validation; "
                            f"add data, or give a separate split with data.validation_split=<split>")
        parts = ds.train_test_split(test_size=n_val, seed=cfg.seed, shuffle=True)
        return parts["train"], parts["test"]
    if cfg.max_val_samples and len(val) > cfg.max_val_samples:
        val = val.select(range(cfg.max_val_samples))
    return ds, val
