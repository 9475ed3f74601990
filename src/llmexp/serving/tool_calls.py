"""The function calls in a served answer, as OpenAI's API returns them (``message.tool_calls``,
``finish_reason: "tool_calls"``), parsed by transformers' response parser (``parse_response``).

The response template says where a call is in the model's text. It is the tokenizer's own
(``response_template``, which newer releases ship), else transformers' for the model's family
(Qwen2/2.5/3, Qwen3.5, Gemma 4, as ``transformers serve`` resolves it), else, for a chat template
that writes calls as Hermes does (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``:
Hermes, Qwen2.5 and the many fine-tunes of their templates), that format. A template is used only
where its start anchor is the chat template's generation prompt (a qwen2 model trained with
another template is not parsed as Qwen's). Without one, calls stay in ``content`` as written.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

_PROBE = [{"role": "user", "content": "x"}]


def generation_prompt(tokenizer) -> Optional[str]:
    """What the chat template adds to ask for the assistant's answer (``<|im_start|>assistant\\n``)."""
    try:
        asked = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, tokenize=False)
        given = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=False, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe has no anchor
        return None
    return asked[len(given):] if asked.startswith(given) and len(asked) > len(given) else None


def hermes_template(tokenizer, anchor: str) -> Optional[Dict[str, Any]]:
    """Hermes' format (a JSON object per call between <tool_call> tags), for a chat template that writes it."""
    if "<tool_call>" not in (tokenizer.chat_template or "") or tokenizer.eos_token is None:
        return None
    return {"defaults": {"role": "assistant"}, "start_anchor": anchor,
            "fields": {"tool_calls": {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "repeats": True,
                                      "content": "json", "transform": {"type": "function", "function": "{content}"}},
                       "content": {"close_pattern": r"\s*" + re.escape(tokenizer.eos_token), "content": "text"}}}


def anchored_here(template: Dict[str, Any], anchor: str) -> bool:
    """Whether the response template's start anchor ends the chat template's generation prompt."""
    starts = template.get("start_anchor")
    starts = [starts] if isinstance(starts, str) else list(starts or [])
    return any(anchor.endswith(s) for s in starts)


def response_template(tokenizer, model_config) -> Optional[Dict[str, Any]]:
    """The response template that finds this model's calls, or None (see the module's docstring)."""
    from transformers.cli.serving.utils import get_response_template

    anchor = generation_prompt(tokenizer)
    if anchor is None:
        return None
    for template in (get_response_template(tokenizer, model_config), hermes_template(tokenizer, anchor)):
        if template is not None and anchored_here(template, anchor):
            return template
    return None


def parsed_answer(tokenizer, template: Dict[str, Any], answer_ids: Sequence[int], prompt_ids: Sequence[int],
                  tools: List[Dict[str, Any]]) -> Tuple[str, Optional[List[Dict[str, Any]]]]:
    """(content, tool calls in OpenAI's form or None) of a generated answer. An answer whose call
    does not parse (cut off at max_tokens, not JSON) is its text, as vLLM's parsers leave it."""
    try:
        parsed = tokenizer.parse_response(list(answer_ids), template, prefix=list(prompt_ids), tools=tools)
    except ValueError:
        return tokenizer.decode(answer_ids, skip_special_tokens=True).strip(), None
    calls = [openai_call(c) for c in parsed.get("tool_calls") or []]
    if any(not c["function"]["name"] for c in calls):  # JSON, but not a call
        return tokenizer.decode(answer_ids, skip_special_tokens=True).strip(), None
    content = (parsed.get("content") or "").strip()
    return content, calls or None


def openai_call(call: Dict[str, Any]) -> Dict[str, Any]:
    """``{"type": "function", "function": {"name", "arguments"}}`` with arguments as JSON text and an id."""
    function = call.get("function") or {}
    arguments = function.get("arguments", {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": str(function.get("name", "")),
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}
