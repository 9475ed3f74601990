"""Tool calls' arguments as a chat template reads them.

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
    applies ``tojson`` to them; the same list otherwise."""
    if not reads_arguments_as_objects(chat_template) or not any(
            isinstance(m, dict) and m.get("tool_calls") for m in messages):
        return messages
    return [{**m, "tool_calls": [_call_as_object(c) for c in m["tool_calls"]]}
            if isinstance(m, dict) and isinstance(m.get("tool_calls"), list) else m for m in messages]
