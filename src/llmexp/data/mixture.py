"""data=mixture: several datasets in one run, rows drawn from each in proportion to its weight.

The mixed rows are one seeded `datasets.Dataset` (interleave_datasets), made before
preparation and the train/validation split, so every stage, the sampler's exact resume and the
held-out split work on it as on any single dataset. A tag column remembers each row's source
until the split, for the per-source counts in summary.json, and is then dropped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

from llmexp.config.schema import DataConfig
from llmexp.data import sources
from llmexp.data.fields import check_field_map, field_map, rename_fields
from llmexp.data.layouts import read_layout
from llmexp.errors import UserError

SOURCE_COLUMN = "__mixture_source"


def source_config(cfg: DataConfig, i: int) -> DataConfig:
    """data.mixture[i] as a single-dataset DataConfig (the rest of data.* shared)."""
    m = cfg.mixture[i]
    return dataclasses.replace(cfg, name=m.name, source=m.source, path=m.path, split=m.split,
                               options=dict(m.options), fields=m.fields, mixture=[], validation_split=None)


def label(cfg: DataConfig, i: int) -> str:
    m = cfg.mixture[i]
    return f"{m.name}" if m.source == "bundled" else f"{m.source}:{m.path}"


def weights(cfg: DataConfig) -> List[float]:
    """The sampling probability of each source: its weight over the sum of the weights."""
    total = sum(m.weight for m in cfg.mixture)
    return [m.weight / total for m in cfg.mixture]


MIXED_FORMATS_FIX = ("mix sources of one format (map a source's columns with its own fields: {...}), or train on "
                     "them one after the other")


def mixed_formats(found: Dict[str, Optional[str]]) -> Optional[str]:
    """Why sources of these formats (by their label) cannot be mixed, or None: the rows cannot share a table."""
    if len(set(found.values())) <= 1:
        return None
    return "its sources have different formats: " + ", ".join(f"{k}: {v or 'none recognised'}" for k, v in found.items())


def load_mixture(cfg: DataConfig):
    """The mixed rows, canonical column names, tagged with their source's index."""
    from datasets import interleave_datasets

    parts = [_load_source(cfg, i) for i in range(len(cfg.mixture))]
    from llmexp.data.formats import detect_format

    said = mixed_formats({f"data.mixture[{i}] {label(cfg, i)!r}": detect_format(p.column_names, {})
                          for i, p in enumerate(parts)})
    if said:  # (preflight says it where it can peek: not into an hf directory)
        raise UserError(f"data.mixture: {said}; {MIXED_FORMATS_FIX}")
    common = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
    parts = [p.select_columns(common) for p in parts]
    for i, p in enumerate(parts[1:], 1):
        try:
            parts[i] = p.cast(parts[0].features)
        except (ValueError, TypeError) as e:
            raise UserError(f"data.mixture[{i}]: the rows of {label(cfg, i)!r} do not have the column types of "
                            f"{label(cfg, 0)!r} ({str(e).splitlines()[0]}); mix datasets of one format") from None
    if len(parts) == 1:
        return parts[0]
    return interleave_datasets(parts, probabilities=weights(cfg), seed=cfg.seed,
                               stopping_strategy=cfg.mixture_stopping)


def _load_source(cfg: DataConfig, i: int):
    sub = source_config(cfg, i)
    try:
        ds, _ = sources.load_raw(sub, in_mixture=True)
        fields = field_map(sub.fields)
        check_field_map(fields, ds.column_names, sub.path or sub.name)
    except UserError as e:
        message = str(e)
        if message.startswith("data."):
            raise UserError(message.replace("data.", f"data.mixture[{i}].", 1)) from None
        raise UserError(f"data.mixture[{i}]: {message}") from None
    ds = read_layout(rename_fields(ds, fields))
    return ds.add_column(SOURCE_COLUMN, [i] * len(ds))


def source_counts(ds) -> Counter:
    """Rows per source index of tagged rows."""
    return Counter(ds[SOURCE_COLUMN])


def count_and_untag(mixed: Counter, train, val, cfg: DataConfig) -> Tuple[Any, Any, Dict[str, Any]]:
    """(train, val) without the tag column, and the record's entry: per source its weight, the
    rows drawn from it (``mixed``) and those it gave the training and validation sets after
    preparation (dedup may drop repeats)."""
    counts = [source_counts(split) for split in (train, val)]
    entry = {"step": "mixture", "stopping": cfg.mixture_stopping,
             "sources": [{"source": label(cfg, i), "weight": m.weight, "share": round(w, 6),
                          "mixed_rows": mixed.get(i, 0), "train_rows": counts[0].get(i, 0),
                          "val_rows": counts[1].get(i, 0)}
                         for i, (m, w) in enumerate(zip(cfg.mixture, weights(cfg)))]}
    return train.remove_columns(SOURCE_COLUMN), val.remove_columns(SOURCE_COLUMN), entry
