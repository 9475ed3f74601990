"""Answer a batch of chat requests with transformers' ``generate``, streaming each one's text.

The server batches concurrent requests (LitServe collects them); this turns one batch into a
sequence of steps, each a list with the new text of every request. Requests with the same
sampling settings share one ``generate`` call (left-padded, as ``llmexp.generate`` does, so a
greedy answer is the one ``python -m llmexp.generate`` prints); each stops at its own end of
sequence or token limit.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


@dataclass
class GenerationRequest:
    messages: List[Dict[str, str]]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    # the chat template's other arguments: tools (the functions it may call), chat_template_kwargs
    template_arguments: Dict[str, Any] = field(default_factory=dict)

    @property
    def tools(self) -> Optional[List[Dict[str, Any]]]:
        return self.template_arguments.get("tools") or None

    def sampling_key(self) -> Tuple[float, float]:
        return (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)


@dataclass
class _Answer:
    """One request's answer as it grows: its tokens, the text sent so far, whether it ended."""

    prompt_tokens: int
    limit: int
    tokens: List[int] = field(default_factory=list)
    sent: str = ""
    done: bool = False
    stopped: bool = False  # ended by a stop token (finish_reason "stop"), not by the token limit ("length")


class _StepQueue(BaseStreamer, StoppingCriteria):
    """A streamer that hands each generated step (one token per row) to the consuming thread, and
    the stopping criterion by which the consumer ends ``generate`` once every answer is done."""

    def __init__(self) -> None:
        self.steps: "queue.Queue[Optional[List[int]]]" = queue.Queue()
        self.error: Optional[BaseException] = None
        self.stop = threading.Event()
        self._prompt_seen = False

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device)

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt ids
            self._prompt_seen = True
            return
        self.steps.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.steps.put(None)


def stop_ids(model, tokenizer) -> set:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _visible(tokenizer, answer: _Answer) -> str:
    """The text to have sent so far: leading and trailing whitespace held back (the final answer is
    stripped, as llmexp.generate's is) and so is an incomplete multi-byte character."""
    text = tokenizer.decode(answer.tokens, skip_special_tokens=True).strip()
    return text[:-1] if text.endswith("\ufffd") and not answer.done else text


def stream_answers(model, tokenizer, requests: List[GenerationRequest],
                   calls_template: Optional[Dict[str, Any]] = None) -> Iterator[List[Dict[str, object]]]:
    """Steps of ``{"content": new text, "reasoning_content": new reasoning}`` per request; the last
    step also carries each request's ``prompt_tokens``, ``completion_tokens``, ``total_tokens`` and
    ``finish_reason`` (``"stop"`` at a stop token, ``"length"`` when cut off at max_tokens). With
    ``calls_template`` (the model's response template, llmexp.serving.tool_calls), a request given
    tools gets its function calls parsed out of its text: the text outside them streams as content, the calls come in the last
    step (``tool_calls``, finish_reason ``"tool_calls"``). A reasoning model's reasoning (between
    ``<think>`` and ``</think>``, or from a prompt that opens it to ``</think>``) streams apart, as
    ``reasoning_content`` (llmexp.reasoning)."""
    from llmexp.reasoning import ReasoningStream, opens_reasoning
    from llmexp.serving.tool_calls import CallParser

    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False,
                                             **r.template_arguments) for r in requests]
    groups: Dict[Tuple[float, float], List[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.sampling_key(), []).append(i)
    answers: List[Optional[_Answer]] = [None] * len(requests)
    parsers = [CallParser(tokenizer, calls_template, tokenizer(p, add_special_tokens=False).input_ids, r.tools)
               if calls_template is not None and r.tools else None for p, r in zip(prompts, requests)]
    thinking = [ReasoningStream(opened=opens_reasoning(p)) for p in prompts]
    for (temperature, top_p), rows in groups.items():
        batch = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False)
        for i, length in zip(rows, batch["attention_mask"].sum(1).tolist()):
            answers[i] = _Answer(prompt_tokens=int(length), limit=requests[i].max_new_tokens)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
            else {"do_sample": False}
        batch = batch.to(model.device)
        limit = max(requests[i].max_new_tokens for i in rows)
        for step in _generate_steps(model, tokenizer, batch, limit, sampling):
            deltas = [""] * len(requests)
            for i, token in zip(rows, step):
                kept = len(answers[i].tokens)
                deltas[i] = _advance(tokenizer, answers[i], token, stop_ids(model, tokenizer))
                if parsers[i] is not None:  # the text outside calls, as the parser knows it
                    deltas[i] = parsers[i].feed(token) if len(answers[i].tokens) > kept else ""
            if any(deltas):
                parts = [thinking[i].feed(d) for i, d in enumerate(deltas)]
                if any(r or c for r, c in parts):
                    yield [{"content": c, "reasoning_content": r} for r, c in parts]
            if all(answers[i].done for i in rows):
                break
    last = []
    for a, parser, split in zip(answers, parsers, thinking):
        end = {"content": "", "prompt_tokens": a.prompt_tokens, "completion_tokens": len(a.tokens),
               "total_tokens": a.prompt_tokens + len(a.tokens), "finish_reason": "stop" if a.stopped else "length"}
        if parser is not None:
            end["content"], calls = parser.finish()
            if calls:
                end.update(tool_calls=calls, finish_reason="tool_calls")
        end["reasoning_content"], end["content"] = split.feed(end["content"], final=True)
        last.append(end)
    yield last


def _advance(tokenizer, answer: _Answer, token: int, stops: set) -> str:
    """Add one generated token to an answer; return the text it newly shows."""
    if answer.done:
        return ""
    if token in stops:
        answer.done = answer.stopped = True
    else:
        answer.tokens.append(token)
        answer.done = len(answer.tokens) >= answer.limit
    text = _visible(tokenizer, answer)
    if not text.startswith(answer.sent):  # a merge changed earlier text: send nothing until it settles
        return ""
    delta, answer.sent = text[len(answer.sent):], text
    return delta


def _generate_steps(model, tokenizer, batch, max_new_tokens: int, sampling: dict) -> Iterator[List[int]]:
    """``model.generate`` in a thread, its steps yielded here as they come."""
    streamer = _StepQueue()

    def work() -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=1,  # as generate's
                               pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([streamer]), **sampling)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            streamer.error = e
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (step := streamer.steps.get()) is not None:
            yield step
    finally:
        streamer.stop.set()  # the consumer has what it needs (or is gone)
        thread.join()
    if streamer.error is not None:
        raise streamer.error
