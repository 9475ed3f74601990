"""The function calls in a served answer, as OpenAI's API returns them (``message.tool_calls``,
``finish_reason: "tool_calls"``), parsed by transformers' response parser (``parse_response``).

The response template says where a call is in the model's text. It is the tokenizer's own
(``response_template``, which newer releases ship), else transformers' for the model's family
(Qwen2/2.5/3, Qwen3.5, Gemma 4, as ``transformers serve`` resolves it), else the format the chat
template writes a call in (rendering one): Hermes' (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``:
Hermes, Qwen2.5 and the many fine-tunes of their templates), Llama 3.1's (the answer is
``{"name": ..., "parameters": ...}``) or Mistral's (``[TOOL_CALLS] [{...}, ...]``). A template is used only
where its start anchor is the chat template's generation prompt (a qwen2 model trained with
another template is not parsed as Qwen's). Without one, calls stay in ``content`` as written.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

_QUESTION = "llmexp probe question"
_PROBE = [{"role": "user", "content": _QUESTION}]


def generation_prompt(tokenizer) -> Optional[str]:
    """What the chat template writes between the user's message and the answer
    (``<|im_end|>\\n<|im_start|>assistant\\n``; Mistral's `` [/INST]``, which has no generation prompt)."""
    try:
        asked = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe has no anchor
        return None
    after = asked.rsplit(_QUESTION, 1)[1] if _QUESTION in asked else ""
    return after if after.strip() else None


# (an id of 9 letters and digits: Mistral's templates refuse others)
_PROBE_CALL = {"id": "llmexp123", "type": "function", "function": {"name": "llmexp_probe", "arguments": {"a": 1}}}
_PROBE_TOOL = {"type": "function", "function": {"name": "llmexp_probe", "parameters": {"type": "object"}}}


def written_call(tokenizer, anchor: str) -> str:
    """How the chat template writes an assistant's call: its text after the user's message and
    ``anchor`` in a conversation whose answer is one call (llmexp_probe, {"a": 1}); "" where it cannot
    say. (Only the text after the question is compared: Mistral's puts the tools before the last
    user message, which the answer moves.)"""
    probe = [*_PROBE, {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}]
    try:
        answered = tokenizer.apply_chat_template(probe, tools=[_PROBE_TOOL], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a call writes none
        return ""
    after = answered.rsplit(_QUESTION, 1)[1] if _QUESTION in answered else ""
    return after[len(anchor):] if after.startswith(anchor) and "llmexp_probe" in after else ""


def _template(anchor: str, calls: Dict[str, Any], content: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A response template: the answer after ``anchor``, its calls as ``calls`` finds them, the rest content."""
    return {"defaults": {"role": "assistant"}, "start_anchor": anchor,
            "fields": {"tool_calls": calls, "content": content or {"content": "text"}}}


def _eos(tokenizer) -> str:
    """The eos as one more alternative of a regex (a call closes there too)."""
    return "|" + re.escape(tokenizer.eos_token) if tokenizer.eos_token else ""


def hermes_template(tokenizer, anchor: str, written: str) -> Optional[Dict[str, Any]]:
    """Hermes' format (a JSON object per call between <tool_call> tags: Hermes, Qwen2.5 and their
    fine-tunes), where the chat template writes calls so."""
    if "<tool_call>" not in written or tokenizer.eos_token is None:
        return None
    return _template(anchor, {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "repeats": True,
                              "content": "json", "transform": {"type": "function", "function": "{content}"}},
                     {"close_pattern": r"\s*" + re.escape(tokenizer.eos_token), "content": "text"})


def json_call_template(tokenizer, anchor: str, written: str) -> Optional[Dict[str, Any]]:
    """Llama 3.1/3.2's format: the answer is the call, ``{"name": ..., "parameters": {...}}``
    (after <|python_tag|> for its built-in tools; several separated by ";"), where the chat template
    writes calls so; an answer that does not start with one is content."""
    found = re.match(r'\s*(?:<\|python_tag\|>)?\{"name": "llmexp_probe", "(parameters|arguments)": ', written)
    if found is None:
        return None
    return _template(anchor, {"open_pattern": r"(?:^|(?<=;))\s*(?:<\|python_tag\|>)?(?=\{)",
                              "close_pattern": r"\s*(?:;|$%s)" % _eos(tokenizer), "repeats": True, "content": "json",
                              "transform": {"type": "function", "function": {
                                  "name": "{content.name}", "arguments": "{content.%s}" % found.group(1)}}})


def mistral_template(tokenizer, anchor: str, written: str) -> Optional[Dict[str, Any]]:
    """Mistral's format: ``[TOOL_CALLS]`` and a JSON list of the calls, where the chat template
    writes calls so."""
    if not written.lstrip().startswith("[TOOL_CALLS]"):
        return None
    return _template(anchor, {"open_pattern": r"\s*\[TOOL_CALLS\]\s*", "close_pattern": r"\s*(?:$%s)" % _eos(tokenizer),
                              "content": "json", "transform_each": True,
                              "transform": {"type": "function",
                                            "function": {"name": "{name}", "arguments": "{arguments}"}}})


def anchored_here(template: Dict[str, Any], anchor: str) -> bool:
    """Whether the response template's start anchor ends the chat template's generation prompt."""
    starts = template.get("start_anchor")
    starts = [starts] if isinstance(starts, str) else list(starts or [])
    return any(anchor.endswith(s) for s in starts)


def family_template(tokenizer, model_config) -> Optional[Dict[str, Any]]:
    """The tokenizer's own response template, else the one ``transformers serve`` uses for the model's
    family (from its serving module; a transformers without it: the tokenizer's alone)."""
    try:
        from transformers.cli.serving.utils import get_response_template
    except ImportError:
        return getattr(tokenizer, "response_template", None)
    return get_response_template(tokenizer, model_config)


def response_template(tokenizer, model_config) -> Optional[Dict[str, Any]]:
    """The response template that finds this model's calls, or None (see the module's docstring;
    None too with a transformers older than its response parser: calls then stay in content)."""
    try:
        from transformers.utils.chat_parsing.response_parser import ResponseParser  # noqa: F401
    except ImportError:
        return None
    anchor = generation_prompt(tokenizer)
    if anchor is None:
        return None
    written = written_call(tokenizer, anchor)
    for template in (family_template(tokenizer, model_config), hermes_template(tokenizer, anchor, written),
                     json_call_template(tokenizer, anchor, written), mistral_template(tokenizer, anchor, written)):
        if template is not None and anchored_here(template, anchor):
            return thinking_as_written(template)
    return None


def thinking_as_written(template: Dict[str, Any]) -> Dict[str, Any]:
    """The template without its reasoning field: a model's <think>...</think> stays in content, as
    it is served without tools (the API's response model has no reasoning_content to put it in)."""
    fields = {k: v for k, v in template["fields"].items() if k not in ("reasoning_content", "thinking")}
    return {**template, "fields": fields}


class CallParser:
    """One answer's function calls, parsed as it is generated (transformers' streaming
    ResponseParser on its tokens): the text outside calls streams as content at once, a call is
    known when its region closes. A call that does not parse (cut off at max_tokens, not JSON, no
    function named) leaves the rest of the answer as the text the model wrote, as vLLM's parsers do."""

    def __init__(self, tokenizer, template: Dict[str, Any], prompt_ids: Sequence[int], tools: List[Dict[str, Any]]):
        from transformers.utils.chat_parsing.response_parser import ResponseParser

        self.tokenizer, self.ids, self.sent, self.calls = tokenizer, [], "", []
        self.failed, self.held = False, ""
        # the parser reads special tokens as text (a delimiter may be one); content leaves them out, as
        # a decode with skip_special_tokens does
        self.specials = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)
        self.parser = ResponseParser(template, prefix=list(prompt_ids), tools=tools, tokenizer=tokenizer)

    def feed(self, token: int) -> str:
        """The content this generated token adds (calls are collected, not returned)."""
        self.ids.append(token)
        if self.failed:
            return self._as_written()
        try:
            return self._content(self.parser.feed([token]))
        except (ValueError, KeyError):  # not JSON, or JSON without the call's keys
            return self._give_up()

    def finish(self) -> Tuple[str, Optional[List[Dict[str, Any]]]]:
        """(the content not yet returned, the calls or None) once the answer has ended."""
        if not self.failed:
            try:
                text = self._content(self.parser.finalize()[1], final=True)
            except (ValueError, KeyError, RuntimeError):  # ended inside a call
                text = self._give_up()
        else:
            text = self._as_written()
        return text, (self.calls or None)

    def _content(self, events: List[Dict[str, Any]], final: bool = False) -> str:
        text = ""
        for event in events:
            if event["type"] == "region_chunk" and event.get("field") == "content" and not event.get("dirty"):
                text += event.get("text") or ""
            elif event["type"] == "region_close" and event.get("field") == "tool_calls":
                value = event.get("value") or {}
                calls = [openai_call(c) for c in (value if isinstance(value, list) else [value])]  # Mistral's: a list
                if not calls or not all(c["function"]["name"] for c in calls):  # JSON, but not a call
                    text = self._without_specials(text, final=True)
                    return text + self._give_up(sending=text)
                self.calls.extend(calls)
        text = self._without_specials(text, final)
        self.sent += text
        return text

    def _without_specials(self, text: str, final: bool) -> str:
        """``text`` (after what was held back) without special tokens; the end of it that may be the
        start of one is held back until the next text says (or the answer ends)."""
        text = self.held + text
        for special in self.specials:
            text = text.replace(special, "")
        keep = 0 if final else max((n for s in self.specials for n in range(1, len(s)) if text.endswith(s[:n])),
                                   default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep] if keep else text

    def _give_up(self, sending: str = "") -> str:
        self.failed, self.calls = True, []
        self.sent += sending
        return self._as_written()

    def _as_written(self) -> str:
        """The answer's text as written, past what was sent of it."""
        import os

        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        rest = text[len(os.path.commonprefix([text, self.sent])):]
        self.sent += rest
        return rest


def parsed_answer(tokenizer, template: Dict[str, Any], answer_ids: Sequence[int], prompt_ids: Sequence[int],
                  tools: List[Dict[str, Any]]) -> Tuple[str, Optional[List[Dict[str, Any]]]]:
    """(content, tool calls in OpenAI's form or None) of a whole generated answer."""
    parser = CallParser(tokenizer, template, prompt_ids, tools)
    content = "".join(parser.feed(t) for t in answer_ids)
    rest, calls = parser.finish()
    return (content + rest).strip(), calls


def openai_call(call: Dict[str, Any]) -> Dict[str, Any]:
    """``{"type": "function", "function": {"name", "arguments"}}`` with arguments as JSON text and an id."""
    function = (call.get("function") or {}) if isinstance(call, dict) else {}
    arguments = function.get("arguments", {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": str(function.get("name", "")),
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}
