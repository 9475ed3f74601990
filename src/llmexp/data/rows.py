"""The values of a dataset's rows checked against its format, before anything is encoded: a
string where messages belong, a message with no content or an unknown role, a column of empty
completions. The first problems are reported with their row number, field and fix (exit 2)."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, List, Optional, Tuple

from llmexp.data.formats import DETECTION_ORDER, FORMAT_COLUMNS
from llmexp.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
# Fields holding a response: a string, or a list of messages ending with the assistant's.
RESPONSES = ("completion", "chosen", "rejected")
SHOWN = 3  # problems listed before "and N more"
# The field whose empty text, row by row, teaches the model to say nothing (noted, not refused).
ANSWERS = ("completion", "chosen", "messages")


def message_problem(value: Any, needs_assistant: bool) -> Optional[str]:
    """Why ``value`` is not a list of chat messages ({role, content} with text), or None."""
    if isinstance(value, str):
        return "is a string, but a list of messages {role, content} is expected"
    if not isinstance(value, list) or not value:
        return f"must be a non-empty list of messages {{role, content}}, got {type(value).__name__}"
    if all(isinstance(m, str) for m in value):
        return ("is a list of strings, but each message must be an object {role, content}: write "
                "[{\"role\": \"user\", \"content\": \"...\"}, {\"role\": \"assistant\", \"content\": \"...\"}] "
                "instead of [\"...\", \"...\"]")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return f"message {i} is a {type(m).__name__}, not {{role, content}}"
        if m.get("role") not in ROLES:
            return f"message {i} has role {m.get('role')!r}; roles are {', '.join(ROLES)}"
        if m.get("content") is None and any(v is not None for k, v in m.items() if k not in ("role", "content")):
            others = ", ".join(k for k, v in m.items() if k not in ("role", "content") and v is not None)
            return f"message {i} ({m.get('role')}) has {others} but no content: a message is {{role, content}}"
        if not isinstance(m.get("content"), str):
            return f"message {i} ({m.get('role')}) has content {m.get('content')!r}, not text"
    if needs_assistant and not any(m["role"] == "assistant" for m in value):
        return "has no assistant message to learn from"
    return None


def value_problem(field: str, value: Any, fmt: str) -> Optional[str]:
    """Why one field of one row cannot be used in format ``fmt``, or None."""
    if field == "messages":
        return message_problem(value, needs_assistant=True)
    if field == "label":  # unpaired preference: is the completion desirable
        return None if isinstance(value, bool) or value in (0, 1) else \
            f"is {value!r}; a label is true (desirable) or false (undesirable)"
    if field == "text" or isinstance(value, str):
        return None if isinstance(value, str) else f"is {type(value).__name__}, not text"
    if isinstance(value, list):  # prompt or response as chat messages
        return message_problem(value, needs_assistant=field in RESPONSES)
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # JSON and Parquet keep a number's type
        return (f"is the number {value!r}, not text: write it as a string ({json.dumps(str(value))}), as a CSV "
                f"file's cells are read")
    return f"is {'null' if value is None else type(value).__name__}, not text or a list of messages"


def _rows(ds, columns: List[str]) -> Iterator[dict]:
    for batch in ds.select_columns(columns).iter(batch_size=1000):
        for i in range(len(batch[columns[0]])):
            yield {c: batch[c][i] for c in columns}


def row_number(n: int) -> str:
    """Where row ``n`` (from 0) is, when nothing better is known: counted from 1, as editors count."""
    return f"row {n + 1}"


def check_rows(ds, fmt: Optional[str], where: str, locate: Callable[[int], str] = row_number) -> Optional[dict]:
    """Raise UserError listing the first rows of ``ds`` whose fields ``fmt`` cannot use, each at
    ``locate(n)`` (a file's line where the rows come from files). Return the preparation log's
    entry for rows whose answer is empty (they teach the model to answer with nothing), or None."""
    own = [c for c in FORMAT_COLUMNS.get(fmt or "", ()) if c in ds.column_names]
    if not own:
        return None
    answered = next((c for c in ANSWERS if c in own), None)
    empty_answers, first_empty = 0, None
    tool_calls, first_call = 0, None
    others = _other_formats(fmt, ds.column_names)
    columns = list(dict.fromkeys([*own, *(c for f in others for c in FORMAT_COLUMNS[f])]))
    problems: List[str] = []
    count, responses_empty = 0, {c: True for c in own if c in RESPONSES}
    foreign: dict = {}  # format -> [rows, place of the first]: rows of another format in the same data
    for n, row in enumerate(_rows(ds, columns)):
        other = next((f for f in others if all(row[c] is not None for c in FORMAT_COLUMNS[f])), None) \
            if any(row[c] is None for c in own) else None
        if other:
            seen = foreign.setdefault(other, [0, None])
            seen[0] += 1
            seen[1] = seen[1] or locate(n)
            continue
        for field in own:
            why = value_problem(field, row[field], fmt)
            if why:
                count += 1
                if len(problems) < SHOWN:
                    problems.append(f"{locate(n)}: {field} {why}")
                continue
            if field in responses_empty and _text_of(row[field]).strip():
                responses_empty[field] = False
            if field == answered and _has_empty_answer(row[field]):
                empty_answers += 1
                first_empty = first_empty or locate(n)
            if _calls_tools(row[field]):
                tool_calls += 1
                first_call = first_call or locate(n)
    if foreign:
        raise UserError(f"data: {where} mixes formats: " + "; ".join(
            f"{rows} row{'s' * (rows != 1)} {'are' if rows != 1 else 'is'} {f} ({'+'.join(FORMAT_COLUMNS[f])}, "
            f"the first at {first})" for f, (rows, first) in foreign.items())
            + f", the others {fmt} ({'+'.join(FORMAT_COLUMNS[fmt])}); one dataset holds one format: convert those "
            "rows" + (" (messages: [{\"role\": \"user\", \"content\": <prompt>}, {\"role\": \"assistant\", "
                      "\"content\": <completion>}])" if {fmt, *foreign} == {"chat", "prompt_completion"} else "")
            + ", or keep them out of data.path")
    if problems:
        more = f" (and {count - len(problems)} more)" if count > len(problems) else ""
        raise UserError(f"data: {where} has rows that format {fmt!r} cannot use{more}:\n    "
                        + "\n    ".join(problems) + "\n  fix those rows, or map other columns with "
                        "data.fields.<name>=<column>")
    empty = [f for f, is_empty in responses_empty.items() if is_empty]
    if empty:
        raise UserError(f"data: every {empty[0]} in {where} is empty, so there is nothing to learn; "
                        f"check the column that data.fields.{empty[0]} names")
    tools, first_tools = _rows_with_tools(ds, fmt, where, locate)
    if empty_answers or tool_calls or tools:
        entry = {"step": "check_rows", "field": answered, "empty": empty_answers, "rows": len(ds), "first": first_empty}
        if tool_calls:
            entry.update(tool_calls=tool_calls, first_tool_call=first_call)
        if tools:
            entry.update(tools=tools, first_tools=first_tools)
        return entry
    return None


def _rows_with_tools(ds, fmt: Optional[str], where: str, locate: Callable[[int], str]) -> Tuple[int, Optional[str]]:
    """(conversations that give tools, where the first is). Refused with its row: a tools value that
    is not function schemas, and tools beside a plain-text prompt (they go to the chat template).
    data.fields.tools names the column."""
    if fmt in (None, "text") or "tools" not in ds.column_names:
        return 0, None
    from llmexp.tool_use import tools_of

    leave_out = "leave the column out (data.fields.tools=<another column>)"
    prompts = ds["prompt"] if fmt != "chat" and "prompt" in ds.column_names else None
    count, first = 0, None
    for n, value in enumerate(ds["tools"]):
        try:
            given = tools_of(value)
        except ValueError as e:
            raise UserError(f"data: {where}, {locate(n)}: tools {e}; fix the row, or name another column with "
                            f"data.fields.tools=<column>") from None
        if not given:
            continue
        if prompts is not None and not isinstance(prompts[n], list):
            raise UserError(f"data: {where}, {locate(n)}: gives tools, which go to the chat template, and its prompt "
                            f"is plain text; give the prompt as messages ([{{\"role\": \"user\", \"content\": ...}}]), "
                            f"or {leave_out}")
        count, first = count + 1, first or locate(n)
    return count, first


def _has_empty_answer(value: Any) -> bool:
    """An answer with no text: the string, or any assistant turn of a conversation (one empty turn
    among others trains the model to end that turn at once); a turn that calls tools is not empty."""
    if isinstance(value, str):
        return not value.strip()
    return any(isinstance(m, dict) and m.get("role") == "assistant" and not (m.get("content") or "").strip()
               and not m.get("tool_calls") for m in value)


def _calls_tools(value: Any) -> bool:
    return isinstance(value, list) and any(isinstance(m, dict) and m.get("tool_calls") for m in value)


def tools_problem(log: List[dict], chat_template: Optional[str], where: str, rollout: bool = False) -> Optional[str]:
    """Why conversations that give tools (function schemas) cannot train with this chat template,
    or None: one that never mentions tools leaves them out, and the model learns to call functions
    it is never shown. A rollout stage (``rollout``) does not give them to the template: its
    sampling, reward model and task metric render prompts without them."""
    from llmexp.tool_use import renders_tools

    entry = next((e for e in log if e.get("step") == "check_rows" and e.get("tools")), None)
    if entry is None:
        return None
    n = entry["tools"]
    if rollout:
        return (f"data: {n} row{'s' * (n != 1)} of {where} give{'s' * (n == 1)} tools (the first at "
                f"{entry['first_tools']}), which the rollout stages do not give the chat template (their sampling, "
                f"reward model and task metric ask without them); leave the column out (data.fields.tools=<another "
                f"column>)")
    if renders_tools(chat_template):
        return None
    return (f"data: {n} conversation{'s' * (n != 1)} of {where} give{'s' * (n == 1)} tools (the first at "
            f"{entry['first_tools']}), which the chat template does not render: the model would learn to call "
            f"functions it is never shown. Give model.chat_template=<a template that renders tools> (a tool-using "
            f"chat model's own, with model.pretrained), or leave the column out (data.fields.tools=<another column>)")


def tool_calls_problem(log: List[dict], chat_template: Optional[str], where: str) -> Optional[str]:
    """Why rows whose assistant turns call tools (OpenAI's ``tool_calls``) cannot train with this
    chat template, or None: one that never mentions tool_calls drops them, and each such turn
    trains as an empty answer."""
    entry = next((e for e in log if e.get("step") == "check_rows" and e.get("tool_calls")), None)
    if entry is None or "tool_calls" in (chat_template or ""):
        return None
    n = entry["tool_calls"]
    return (f"data: {n} row{'s' * (n != 1)} of {where} {'have' if n != 1 else 'has'} assistant turns with tool_calls "
            f"(the first at {entry['first_tool_call']}), which the chat template does not render: each call would "
            f"train as an empty answer. Give model.chat_template=<a template that renders tool_calls> (a tool-using "
            f"chat model's own, with model.pretrained), write the calls into the turns' content, or leave those rows "
            f"out")


def empty_answers_note(log: List[dict]) -> Optional[str]:
    """The warning for the rows check_rows found with an empty answer (from the preparation log)."""
    entry = next((e for e in log if e.get("step") == "check_rows" and e.get("empty")), None)
    if entry is None:
        return None
    what = "an assistant message" if entry["field"] == "messages" else f"a {entry['field']}"
    has = "has" if entry["empty"] == 1 else "have"
    return (f"data: {entry['empty']} of {entry['rows']} rows {has} {what} with no text (the first at {entry['first']}): "
            f"the model learns to answer their prompts with nothing; fill them in or remove them if that is not meant")


def _other_formats(fmt: Optional[str], columns: List[str]) -> List[str]:
    """The formats, other than ``fmt``, whose columns the data also has and which are not part of
    ``fmt``'s (a file of chat rows and prompt/completion rows has both columns, each row one half)."""
    mine = set(FORMAT_COLUMNS.get(fmt or "", ()))
    return [f for f in DETECTION_ORDER if f != fmt and set(FORMAT_COLUMNS[f]) <= set(columns)
            and not set(FORMAT_COLUMNS[f]) <= mine]


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    return " ".join(m.get("content") or "" for m in value if isinstance(m, dict) and m.get("role") == "assistant")
