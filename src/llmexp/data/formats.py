"""Which data format a dataset has, and which formats each stage accepts.

Import-light on purpose: the config validator uses it to refuse, before any model is built, a
stage whose data lacks the fields it needs (e.g. stage=sft on plain text).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

from llmexp.data.layouts import LAYOUT_COLUMNS, layout

# Canonical columns of each format (after the data.fields mapping is applied).
FORMAT_COLUMNS: Dict[str, Tuple[str, ...]] = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "prompt_only": ("prompt",),
    "text": ("text",),
}
# Detection order: the most specific format first.
DETECTION_ORDER = ("preference", "unpaired_preference", "chat", "prompt_completion", "text", "prompt_only")



def canonical_columns(columns: Iterable[str], fields: Dict[str, str]) -> set:
    """The canonical field names present, given the source columns and the field mapping."""
    columns = set(columns)
    present = {canon for canon, source in fields.items() if source in columns}
    present |= {c for c in columns if c not in fields.values()}
    if {"chosen", "rejected"} <= present:  # an implicit prompt: the turns both answers start with
        present.add("prompt")
    kind = layout(present)  # ShareGPT or Alpaca, read as llmexp's columns (llmexp.data.layouts)
    return present | set(LAYOUT_COLUMNS[kind]) if kind else present


def detect_format(columns: Iterable[str], fields: Dict[str, str]) -> Optional[str]:
    """The first format whose columns are all present, or None."""
    present = canonical_columns(columns, fields)
    for fmt in DETECTION_ORDER:
        if all(c in present for c in FORMAT_COLUMNS[fmt]):
            return fmt
    return None


def format_problem(stage: str, fmt: Optional[str], columns: Iterable[str], fields: Dict[str, str],
                   where: str, row: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """A sentence saying why ``stage`` cannot use data of format ``fmt``, or None when it can
    (``row``: a first row, whose values can say which column holds a conversation)."""
    from llmexp.config.stages import STAGES

    accepted = STAGES[stage].formats if stage in STAGES else None
    if accepted is None or fmt in accepted:
        return None
    needs = " or ".join("+".join(FORMAT_COLUMNS[f]) for f in accepted)
    have = ", ".join(sorted(columns)) or "no columns"
    what = f"format {fmt!r}" if fmt else "no recognised format"
    turns = next((c for c in sorted(columns) if _holds_turns((row or {}).get(c))), None) \
        if fmt is None and "chat" in accepted else None
    example = (f" (data.fields.messages={turns}: it holds a conversation's turns; in data.mixture: "
               f"fields: {{messages: {turns}}})" if turns else "")
    return (f"stage={stage} needs fields {needs}, but {where} has {what} (columns: {have}); "
            f"map your columns with data.fields.<name>=<column>{example} or choose another stage")


def _holds_turns(value: Any) -> bool:
    """A list of message objects ({role, content}, or ShareGPT's {from, value})."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and ({"role", "content"} <= set(m) or {"from", "value"} <= set(m)) for m in value)


def answer_text(value: Any) -> Optional[str]:
    """The answer text of a completion: a string, or the last message's content."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        content = value[-1].get("content")
        return content if isinstance(content, str) else None
    return None


def normalize(text: str) -> str:
    return " ".join(text.split())


def reference_match(completion: str, reference: Optional[str] = None) -> float:
    """1.0 when the answer equals the reference (whitespace-normalised): the task metric's
    ``reference`` check and the rollout stages' default reward on a user's data. A reasoning
    model's answer is what follows its reasoning (llmexp.reasoning), the reference's likewise."""
    from llmexp.reasoning import answer_of

    return float(reference is not None and normalize(answer_of(completion)) == normalize(answer_of(reference)))
