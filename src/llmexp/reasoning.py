"""Reasoning ("thinking") models: an answer written after ``<think>...</think>``.

Qwen3, QwQ, DeepSeek-R1 and its distills, SmolLM3 and Phi-4-reasoning write their reasoning
between ``<think>`` and ``</think>`` and then the answer; templates like DeepSeek-R1's open the
block in the generation prompt, so the model writes only its end. What a user asks of such a
model is its answer: the task metric and llmexp's own rewards check the text after the
reasoning (the whole text failed every check), and ``llmexp serve`` returns the reasoning apart,
as ``reasoning_content`` (as vLLM's reasoning parsers and DeepSeek's API do).

Datasets keep an assistant turn's reasoning in its own key (``reasoning_content``: Qwen3's
template, vLLM, DeepSeek's API; ``reasoning``; ``thinking``: gpt-oss', LFM2's). A template that
reads one of them gets the turn's reasoning under that name; a template that reads none (llmexp's
own, Llama's) would drop it silently, so it is written into the content as ``<think>\\n...\\n</think>``
before the answer, as Qwen3's template writes it, and the model learns to think so.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

OPEN, CLOSE = "<think>", "</think>"
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def split_reasoning(text: str, opened: bool = False) -> Tuple[Optional[str], str]:
    """(reasoning, answer) of a model's text; reasoning is None when the text has none.

    ``opened``: the prompt ended inside a reasoning block (DeepSeek-R1's template), so the text
    starts with reasoning. Reasoning never closed (cut off at the token limit) leaves no answer."""
    stripped = text.lstrip()
    if not opened and not stripped.startswith(OPEN):
        return None, text
    body = stripped[len(OPEN):] if stripped.startswith(OPEN) else stripped
    if CLOSE not in body:
        return body.strip(), ""
    reasoning, _, answer = body.partition(CLOSE)
    return reasoning.strip(), answer.strip()


def answer_of(text: str) -> str:
    """The answer of a model's text: after its reasoning, if it has any. ``</think>`` alone (the
    reasoning opened by the prompt) counts too: an answer never holds it."""
    if CLOSE in text:
        return text.partition(CLOSE)[2].strip()
    return split_reasoning(text)[1]


def opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt ends inside a reasoning block (its generation prompt opens one)."""
    tail = prompt.rstrip()
    return tail.endswith(OPEN)


class ReasoningStream:
    """Split a streamed answer's text deltas into (reasoning, content) deltas.

    Text that might be the start of a marker is held back until the next delta says; leading
    whitespace of each part is dropped (as the whole text's is)."""

    def __init__(self, opened: bool = False):
        self.state = "reasoning" if opened else "start"  # start: not yet known whether it thinks
        self.pending = ""
        self.started = {"reasoning": False, "content": False}

    def feed(self, delta: str, final: bool = False) -> Tuple[str, str]:
        """The reasoning and content text that ``delta`` (and what was held back) shows."""
        self.pending += delta
        reasoning, content = [], []
        while self.pending:
            if self.state == "start":
                text = self.pending.lstrip()
                if text.startswith(OPEN):
                    self.pending, self.state = text[len(OPEN):], "reasoning"
                elif not final and (not text or OPEN.startswith(text)):
                    break  # "<thi": wait
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                at = self.pending.find(CLOSE)
                if at >= 0:
                    reasoning.append(self.pending[:at].rstrip())
                    self.pending, self.state = self.pending[at + len(CLOSE):], "content"
                    continue
                # held back: what may begin the marker, and the whitespace before it (the reasoning
                # is sent without the whitespace that ends it, as split_reasoning gives it)
                body = self.pending[: len(self.pending) - (0 if final else _partial_marker(self.pending, CLOSE))]
                sent = body if final else body.rstrip()
                reasoning.append(sent)
                self.pending = self.pending[len(sent):]
                break
            else:
                content.append(self.pending)
                self.pending = ""
        return self._part("reasoning", "".join(reasoning), final), self._part("content", "".join(content), final)

    def _part(self, name: str, text: str, final: bool) -> str:
        if not self.started[name]:
            text = text.lstrip()
            self.started[name] = bool(text)
        return text.rstrip() if final else text


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (held back: it may be one)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def key_read_by(chat_template: Optional[str]) -> Optional[str]:
    """The message key the template reads an assistant turn's reasoning from, if any."""
    for key in REASONING_KEYS:
        if re.search(rf"""(\.|\[['"]){key}\b""", chat_template or ""):
            return key
    return None


def with_reasoning_as_the_template_reads(messages: List[Dict[str, Any]], chat_template: Optional[str]
                                         ) -> List[Dict[str, Any]]:
    """``messages`` with each assistant turn's reasoning under the key ``chat_template`` reads, or,
    when it reads none, written into the turn's content before the answer; the same list when no
    turn has reasoning."""
    if not any(isinstance(m, dict) and any(m.get(k) for k in REASONING_KEYS) for m in messages):
        return messages
    key = key_read_by(chat_template)
    out = []
    for m in messages:
        given = next((m[k] for k in REASONING_KEYS if isinstance(m, dict) and m.get(k)), None)
        if given is None:
            out.append(m)
            continue
        rest = {k: v for k, v in m.items() if k not in REASONING_KEYS}
        if key is not None:
            out.append({**rest, key: given})
        else:
            out.append({**rest, "content": f"{OPEN}\n{str(given).strip()}\n{CLOSE}\n\n{m.get('content') or ''}"})
    return out
