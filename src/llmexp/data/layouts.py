"""Dataset layouts people share, read as llmexp's formats, so that a file from the hub trains as it
is (as axolotl and LLaMA-Factory read them):

- ShareGPT: a ``conversations`` column (or the column ``data.fields.messages`` names) of turns
  ``{"from": "human" | "gpt" | "system" | "observation" | "function_call", "value": text}``, read as
  chat ``messages`` of ``{role, content}`` (human: user, gpt: assistant, observation: tool); a
  ``system`` column becomes the first message.
- Alpaca: ``instruction``, an optional ``input`` and ``output`` (optionally ``system`` and
  ``history``, a list of [question, answer] pairs), read as chat ``messages``: the system message,
  the history's turns, the instruction and its input joined by a newline as the user's message,
  and the output as the assistant's. Chat, like ShareGPT, so that the two mix in one data=mixture
  (SFT learns the assistant's turns).

Import-light: preflight detects a layout from the first row's columns before anything loads.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "function_call": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool", "function": "tool"}
ALPACA_COLUMNS = ("instruction", "input", "output", "system", "history")
# What each layout is read as (the canonical columns it gives).
LAYOUT_COLUMNS = {"sharegpt": ("messages",), "alpaca": ("messages",)}


def layout(columns: Iterable[str]) -> Optional[str]:
    """``sharegpt`` or ``alpaca`` when the (mapped) columns are that layout's; None when they are
    llmexp's own formats or neither."""
    cols = set(columns)
    if cols & {"messages", "prompt", "text", "chosen"}:
        return None
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    return None


def sharegpt_messages(turns: Any, system: Any = None) -> Any:
    """ShareGPT turns as {role, content} messages (turns already in that form pass through; an unknown
    speaker keeps its name as the role, which the row check then names)."""
    if not isinstance(turns, list):
        return turns
    out: List[Any] = []
    if isinstance(system, str) and system.strip() and not (
            turns and isinstance(turns[0], dict) and _speaker(turns[0]) == "system"):
        out.append({"role": "system", "content": system})
    for turn in turns:
        if isinstance(turn, dict) and turn.get("role") is None and ("from" in turn or "value" in turn):
            speaker = turn.get("from")
            turn = {"role": SHAREGPT_ROLES.get(str(speaker).lower(), speaker) if speaker is not None else None,
                    "content": turn.get("value")}
        elif isinstance(turn, dict):
            turn = {"role": turn.get("role"), "content": turn.get("content")}
        out.append(turn)
    return out


def _speaker(turn: Dict[str, Any]) -> Optional[str]:
    role = turn.get("role") if turn.get("role") is not None else turn.get("from")
    return SHAREGPT_ROLES.get(str(role).lower(), role) if role is not None else None


def alpaca_messages(row: Dict[str, Any]) -> Dict[str, Any]:
    """One Alpaca row as chat messages."""
    messages: List[Dict[str, Any]] = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    for pair in row.get("history") or []:
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction, extra = row.get("instruction"), row.get("input")
    question = "\n".join(t for t in (instruction, extra) if isinstance(t, str) and t.strip()) \
        if isinstance(instruction, str) else instruction
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": row.get("output")}]
    return {"messages": messages}


def _has_sharegpt_turns(ds) -> bool:
    """Whether the messages of the first rows are ShareGPT turns (from/value) rather than role/content."""
    for row in ds.select(range(min(len(ds), 100)))["messages"]:
        for turn in row or []:
            if isinstance(turn, dict) and turn.get("role") is None and turn.get("from") is not None:
                return True
    return False


def read_layout(ds):
    """``ds`` (a datasets.Dataset, its columns already mapped by data.fields) with a ShareGPT or
    Alpaca layout in llmexp's canonical columns; any other data as it is."""
    if ds is None:
        return ds
    kind = layout(ds.column_names)
    if kind == "alpaca":
        present = [c for c in ALPACA_COLUMNS if c in ds.column_names]
        return ds.map(alpaca_messages, remove_columns=present, desc="alpaca -> messages")
    if kind == "sharegpt":
        ds = ds.rename_column("conversations", "messages")
    if "messages" not in ds.column_names or not len(ds):
        return ds
    has_system = "system" in ds.column_names
    if not (has_system and kind == "sharegpt") and not _has_sharegpt_turns(ds):
        return ds
    return ds.map(lambda row: {"messages": sharegpt_messages(row["messages"], row.get("system") if has_system else None)},
                  remove_columns=["system"] if has_system and kind == "sharegpt" else None,
                  desc="sharegpt -> messages")
