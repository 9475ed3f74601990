"""data.fields: which column of the source data holds each field a stage format needs."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from llmexp.config.schema import FieldMap
from llmexp.errors import UserError


def field_map(fields: Any) -> Dict[str, str]:
    """data.fields (a FieldMap or a mapping) as {canonical name: source column}."""
    return dict(fields) if isinstance(fields, dict) else dict(vars(fields))


def rename_fields(ds, fields: Dict[str, str]):
    mapping = {src: canon for canon, src in fields.items() if src != canon and src in ds.column_names}
    return ds.rename_columns(mapping) if mapping else ds


def unknown_mappings(fields: Dict[str, str], columns: List[str]) -> List[Tuple[str, str]]:
    """The (field, column) pairs of data.fields entries the user changed that name no column of
    the data (else the mapping is silently ignored and another format detected)."""
    defaults = vars(FieldMap())
    return [(canon, source) for canon, source in fields.items()
            if source != defaults.get(canon, canon) and source not in columns]


def check_field_map(fields: Dict[str, str], columns: List[str], where: str) -> None:
    """The loaded data's check (preflight checks what it can peek at)."""
    for canon, source in unknown_mappings(fields, columns):
        raise UserError(f"data.fields.{canon}={source}: {where!r} has no column {source!r} (columns: "
                        f"{', '.join(columns)}); name one of them")


def extract_implicit_prompt(ds):
    """Preference rows with no prompt column (TRL's implicit-prompt format: whole conversations in
    chosen and rejected): the turns both share become the prompt, as TRL's extract_prompt does."""
    if ds is None or "prompt" in ds.column_names or not {"chosen", "rejected"} <= set(ds.column_names):
        return ds
    from trl.data_utils import extract_prompt

    return ds.map(extract_prompt, desc="extract_prompt")


def diverging_pairs(ds) -> Optional[Dict[str, Any]]:
    """Pairs whose chosen and rejected part before their last answer (a user turn differs): the
    shared prefix is their prompt, so DPO trained the turns after it, a user's among them.
    ``{"step": "extract_prompt", "diverging": n, "first": row}`` (rows from 1), or None."""
    if ds is None or not {"chosen", "rejected"} <= set(ds.column_names):
        return None
    first, n = None, 0
    for i, (chosen, rejected) in enumerate(zip(ds["chosen"], ds["rejected"]), 1):
        if any(isinstance(side, list) and side and isinstance(side[0], dict) and side[0].get("role") != "assistant"
               for side in (chosen, rejected)):
            n += 1
            first = first or i
    return {"step": "extract_prompt", "diverging": n, "first": first} if n else None


def diverging_note(log: List[Dict[str, Any]]) -> Optional[str]:
    """The warning for :func:`diverging_pairs` (from the preparation log)."""
    entry = next((e for e in log if e.get("step") == "extract_prompt"), None)
    if entry is None:
        return None
    n = entry["diverging"]
    return (f"data: {n} pair{'s' if n != 1 else ''}' chosen and rejected differ before the last answer (the first at "
            f"row {entry['first']}): the turns after the difference train as the answer, a user's among them; make "
            f"each pair share every turn but its last answer")
