"""Tool use as a chat template reads it: the tools a conversation may call, and its calls' arguments.

A conversation's ``tools`` (OpenAI's list of function schemas; datasets often keep it as JSON
text, which Arrow holds whatever the schemas' shapes) go to the template with the messages, as
``apply_chat_template(messages, tools=...)`` takes them, in training and in ``llmexp serve``: a
tool-using model's template writes them into its system turn, and a model trained without them
learns to call functions it was never shown.

OpenAI's API sends an assistant's tool call arguments as a JSON string, and most datasets store
them so (Arrow cannot hold a dict of varying keys); the templates of tool-using models (Qwen2.5's,
Llama 3.1's, Hermes', Mistral's) write ``arguments | tojson``, which wrote such a string as a quoted,
escaped string (``"arguments": "{\\"city\\": \\"Paris\\"}"``), not the object the model was trained
on. Where a template applies ``tojson`` to the arguments, a string that holds a JSON object is
given to it as that object, in training and in serving alike (as vLLM's server does); a template
that writes the arguments as they are gets them as they are.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional

_TOJSON_ARGUMENTS = re.compile(r"arguments\s*\|\s*tojson")


def reads_arguments_as_objects(chat_template: Optional[str]) -> bool:
    """Whether the template writes tool call arguments with ``tojson``."""
    return bool(chat_template) and bool(_TOJSON_ARGUMENTS.search(chat_template))


def _as_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return arguments


def _call_as_object(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    if isinstance(function, dict) and "arguments" in function:  # OpenAI's {"type": "function", "function": {...}}
        return {**call, "function": {**function, "arguments": _as_object(function["arguments"])}}
    if "arguments" in call:  # {"name": ..., "arguments": ...}
        return {**call, "arguments": _as_object(call["arguments"])}
    return call


def as_the_template_reads(messages: List[Dict[str, Any]], chat_template: Optional[str]) -> List[Dict[str, Any]]:
    """``messages`` with their tool calls' JSON-object arguments parsed where ``chat_template``
    applies ``tojson`` to them, and their reasoning where it reads it (llmexp.reasoning); the same
    list otherwise."""
    from llmexp.reasoning import with_reasoning_as_the_template_reads

    messages = with_reasoning_as_the_template_reads(messages, chat_template)
    if not reads_arguments_as_objects(chat_template) or not any(
            isinstance(m, dict) and m.get("tool_calls") for m in messages):
        return messages
    return [{**m, "tool_calls": [_call_as_object(c) for c in m["tool_calls"]]}
            if isinstance(m, dict) and isinstance(m.get("tool_calls"), list) else m for m in messages]


def renders_tools(chat_template: Optional[str]) -> bool:
    """Whether the template uses a conversation's ``tools`` (one that never names them drops them)."""
    return "tools" in (chat_template or "").replace("tool_calls", "")


def tools_of(value: Any) -> Optional[List[Dict[str, Any]]]:
    """A row's tools as the template takes them: a list of function schemas (each a dict), from
    the list or its JSON text; None for none (null, "", []). ValueError says what is wrong."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"is text that is not JSON ({e.msg} at character {e.pos})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError(f"is {type(value).__name__}, not a list of function schemas (OpenAI's tools) or its JSON text")
    return value or None
