"""Rollouts in which the policy calls tools (stage.rollout.tools): sample, run the calls it wrote,
write their results back as the template writes a tool's message, and let it answer on.

A response is then several turns in one token sequence: the model's (a call ending with eos),
the tools' results with the template's generation prompt after them, the model's again. The
sequence is exactly the conversation as the chat template renders it (tested), so the loss's
forward pass sees what the model will see when asked so. Only the model's own tokens are in the
loss, the KL and the response length (``model_mask``); the results' are context (``real_mask``).
The reward scores the answer after the last result (``answers``), and rewards that take a
``tool_calls`` column get each call with its result.

Calls are found by the response parser ``llmexp serve`` uses (llmexp.serving.tool_calls), so
whatever format serve parses (Hermes/Qwen2.5, Llama 3.1, Mistral, the model's own response
template) trains here too. The results' tokens are what the template writes after the model's
turn: rendered after a call and cut at the end of that turn (the template must render the tools'
results after a call the same way whatever the call was: the chat templates of tool-using models
do; TRL's tool loop needs the same).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from llmexp.errors import UserError

if TYPE_CHECKING:
    import torch

KEY = "stage.rollout.tools"


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    schema: Dict[str, Any]  # {"type": "function", "function": {"name", "description", "parameters"}}


def load_tools(names: List[str], key: str = KEY) -> List[Tool]:
    """The tools by registered name or ``module:function``, each with the schema the model is
    shown (transformers' ``get_json_schema``); problems are said under ``key``."""
    from transformers.utils import get_json_schema

    from llmexp.rewards import load_function

    tools, seen = [], set()
    for name in names:
        fn, owner = load_function(name, key, "llmexp_tools")
        try:
            schema = get_json_schema(fn)
        except Exception as e:  # noqa: BLE001 - transformers' reasons: no docstring, an argument without a type hint
            raise UserError(f"{key}: {name!r} of {owner} cannot be described to the model ({e}); fix: give every "
                            f"argument a type hint and the function a docstring with an Args: section "
                            f"describing each") from None
        called = name.rpartition(":")[2]
        schema["function"]["name"] = called
        schema["function"].pop("return", None)
        if called in seen:
            raise UserError(f"{key}: two tools are called {called!r}; the model calls a tool by its name")
        seen.add(called)
        tools.append(Tool(called, fn, schema))
    return tools


def tools_problem(tokenizer, model_config) -> Optional[str]:
    """Why the model cannot be given tools through its chat template, or None."""
    from llmexp.serving.tool_calls import response_template
    from llmexp.tool_use import renders_tools

    template = tokenizer.chat_template or ""
    if not renders_tools(template) or "tool_calls" not in template:
        return ("the chat template does not render tools and an assistant's tool_calls, so the model could neither "
                "be shown the tools nor learn its calls; give model.chat_template=<a template that renders them> (a "
                "tool-using model's own, with model.pretrained)")
    if response_template(tokenizer, model_config) is None:
        return ("no format of a call is known for this chat template (serve's parsers: Hermes' <tool_call>, Llama "
                "3.1's JSON, Mistral's [TOOL_CALLS], a tokenizer's response_template), so the model's calls could not "
                "be found; give model.chat_template=<a template that writes calls in one of them>")
    try:
        result_tokens(tokenizer, [_PROBE_CALL], ["llmexp probe result"], [_PROBE_SCHEMA])
    except ValueError as e:
        return str(e)
    return None


_PROBE_CALL = {"id": "call_llmexp0", "type": "function", "function": {"name": "llmexp_probe", "arguments": "{}"}}
_PROBE_SCHEMA = {"type": "function", "function": {"name": "llmexp_probe", "parameters": {"type": "object"}}}


def result_tokens(tokenizer, calls: List[Dict[str, Any]], results: List[str],
                  schemas: List[Dict[str, Any]]) -> List[int]:
    """The tokens the chat template writes after an assistant's turn that made ``calls`` (after its
    eos): the tools' messages with ``results`` and the generation prompt of the model's next turn."""
    from llmexp.tool_use import as_the_template_reads

    eos = tokenizer.eos_token
    called = [{"role": "user", "content": "llmexp"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    answered = called + [{"role": "tool", "tool_call_id": c.get("id"), "name": c["function"]["name"], "content": r}
                         for c, r in zip(calls, results)]
    template = tokenizer.chat_template
    before = tokenizer.apply_chat_template(as_the_template_reads(called, template), tools=schemas, tokenize=False)
    after = tokenizer.apply_chat_template(as_the_template_reads(answered, template), tools=schemas, tokenize=False,
                                          add_generation_prompt=True)
    turns = before.count(eos)  # the model's turn ends at the last of them
    cut = -1
    for _ in range(turns):
        cut = after.find(eos, cut + 1)
        if cut < 0:
            break
    if turns == 0 or cut < 0 or results[-1] not in after[cut:]:
        raise ValueError(f"the chat template does not write a tool's result after the assistant's turn that called it "
                         f"(ended by {eos!r}); give model.chat_template=<a template that renders role 'tool' messages "
                         f"after a call>")
    return tokenizer(after[cut + len(eos):], add_special_tokens=False)["input_ids"]


def run_call(tools: Dict[str, Tool], call: Dict[str, Any]) -> Tuple[str, bool]:
    """(the result written back, whether the call failed): a call that names no tool, whose
    arguments are not a JSON object or the tool's, or that raises, gets the error as its result,
    as TRL's tool loop gives it (the model can learn from it)."""
    name = call["function"]["name"]
    if name not in tools:
        return f"error: no tool named {name!r} (the tools: {', '.join(sorted(tools))})", True
    try:
        arguments = json.loads(call["function"]["arguments"] or "{}")
    except ValueError as e:
        return f"error: the arguments are not JSON ({e})", True
    if not isinstance(arguments, dict):
        return "error: the arguments must be a JSON object", True
    try:
        return str(tools[name].fn(**arguments)), False
    except Exception as e:  # noqa: BLE001 - the tool's failure is the model's to see
        return f"error: {type(e).__name__}: {e}", True


@dataclass
class ToolTurns:
    """What a tool-calling rollout adds to its responses, one row per response."""

    model_mask: torch.Tensor  # [N, T] 1 on the model's own tokens (its eos too), 0 on results and padding
    real_mask: torch.Tensor  # [N, T] 1 on every token of the response (results too), 0 on padding
    answers: List[str]  # the text of the model's last turn: the answer after the last result
    ended: torch.Tensor  # [N] bool: the last turn ended at eos (not cut off, not a call past the last round)
    calls: List[List[Dict[str, Any]]]  # per row: {"name", "arguments", "result", "failed"} for each call run

    def rows(self, start: int, stop: int) -> "ToolTurns":
        return ToolTurns(self.model_mask[start:stop], self.real_mask[start:stop], self.answers[start:stop],
                         self.ended[start:stop], self.calls[start:stop])

    def cut(self, width: int) -> "ToolTurns":
        return ToolTurns(self.model_mask[:, :width], self.real_mask[:, :width], self.answers, self.ended, self.calls)


@dataclass
class _Row:
    prompt: List[int]
    segments: List[Tuple[List[int], bool]] = field(default_factory=list)  # (tokens, the model's own)
    calls: List[Dict[str, Any]] = field(default_factory=list)
    answer: str = ""
    ended: bool = False
    done: bool = False

    def context(self) -> List[int]:
        return self.prompt + [t for seg, _ in self.segments for t in seg]


def _up_to_eos(ids: List[int], eos: int, pad: int) -> List[int]:
    if eos in ids:
        return ids[: ids.index(eos) + 1]
    return [t for t in ids if t != pad] if pad != eos else ids


def sample_with_tools(engine, tokenizer, template: Dict[str, Any], tools: List[Tool], prompt_ids: torch.Tensor,
                      prompt_mask: torch.Tensor, max_new_tokens: int, max_calls: int, samples_per_prompt: int = 1,
                      **sampling: Any):
    """``samples_per_prompt`` responses to each prompt (prompt-major), each answering on after the
    results of the calls it writes, for up to ``max_calls`` rounds; each of the model's turns is at
    most ``max_new_tokens`` long. Returns a ``Sampled`` with ``turns``."""
    import torch

    from llmexp.data.collate import collate_prompts, pad_rows
    from llmexp.sampler import Sampled
    from llmexp.serving.tool_calls import parsed_answer

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    by_name = {t.name: t for t in tools}
    schemas = [t.schema for t in tools]
    k = samples_per_prompt
    first = engine(prompt_ids, prompt_mask, max_new_tokens, samples_per_prompt=k, **sampling).responses
    asked = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids.repeat_interleave(k, 0),
                                                      prompt_mask.repeat_interleave(k, 0))]
    rows = [_Row(p, [(_up_to_eos(r, eos, pad), True)]) for p, r in zip(asked, first.tolist())]
    for round_ in range(max_calls + 1):
        pending = []
        for row in rows:
            if row.done:
                continue
            turn = row.segments[-1][0]
            before = row.context()[: len(row.context()) - len(turn)]
            content, calls = parsed_answer(tokenizer, template, turn, before, schemas) \
                if turn and turn[-1] == eos else (tokenizer.decode(turn, skip_special_tokens=True).strip(), None)
            row.answer = content
            if not turn or turn[-1] != eos or not calls or round_ == max_calls:
                row.done, row.ended = True, bool(turn) and turn[-1] == eos and not calls
                continue
            results = [run_call(by_name, c) for c in calls]
            row.calls += [{"name": c["function"]["name"], "arguments": c["function"]["arguments"], "result": r,
                           "failed": failed} for c, (r, failed) in zip(calls, results)]
            row.segments.append((result_tokens(tokenizer, calls, [r for r, _ in results], schemas), False))
            pending.append(row)
        if not pending:
            break
        batch = collate_prompts([{"input_ids": row.context(), "prompt": None, "columns": {}} for row in pending], pad)
        out = engine(batch["prompt_ids"].to(prompt_ids.device), batch["prompt_mask"].to(prompt_ids.device),
                     max_new_tokens, samples_per_prompt=1, **sampling).responses
        for row, r in zip(pending, out.tolist()):
            row.segments.append((_up_to_eos(r, eos, pad), True))
    responses = pad_rows([[t for seg, _ in row.segments for t in seg] for row in rows], pad).to(prompt_ids.device)
    model = pad_rows([[int(own) for seg, own in row.segments for _ in seg] for row in rows], 0).to(prompt_ids.device)
    real = pad_rows([[1] * sum(len(seg) for seg, _ in row.segments) for row in rows], 0).to(prompt_ids.device)
    turns = ToolTurns(model.float(), real, [row.answer for row in rows],
                      torch.tensor([row.ended for row in rows], device=prompt_ids.device), [row.calls for row in rows])
    return Sampled(responses, turns=turns)
