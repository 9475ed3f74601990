"""Turn one example into token ids and labels for causal-LM stages.

Labels use -100 for positions that carry no loss: prompts and user turns in SFT (the loss counts
only assistant / completion tokens), nothing in pretraining. Every sequence ends with eos so a
model learns to stop.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

IGNORE_INDEX = -100


def _ids(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_text(tokenizer, text: str) -> Dict[str, List[int]]:
    ids = _ids(tokenizer, text) + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def encode_prompt_completion(tokenizer, prompt: str, completion: str, completion_only: bool) -> Dict[str, List[int]]:
    """Plain-string prompt and completion; the prompt carries no loss when completion_only."""
    p, c = _ids(tokenizer, prompt), _ids(tokenizer, completion) + [tokenizer.eos_token_id]
    labels = ([IGNORE_INDEX] * len(p) if completion_only else list(p)) + list(c)
    return {"input_ids": p + c, "labels": labels}


def encode_chat(tokenizer, messages: List[Dict[str, Any]], assistant_only: bool,
                tools: Optional[List[Dict[str, Any]]] = None) -> Dict[str, List[int]]:
    """Render with the chat template (and the conversation's ``tools``, llmexp.tool_use); label
    only assistant turns when assistant_only."""
    from llmexp.tool_use import as_the_template_reads

    messages = as_the_template_reads(messages, tokenizer.chat_template)
    with_tools = {"tools": tools} if tools else {}
    if not assistant_only:
        ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **with_tools)["input_ids"])
        return {"input_ids": ids, "labels": list(ids)}
    if "{% generation %}" in (tokenizer.chat_template or ""):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, **with_tools)
        ids, mask = list(out["input_ids"]), out["assistant_masks"]
    else:
        ids, mask = _mask_by_prefixes(tokenizer, messages, with_tools)
    return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]}


def _mask_by_prefixes(tokenizer, messages: List[Dict[str, Any]], with_tools: Dict[str, Any]):
    """Assistant mask for templates without generation markers: each assistant turn spans from
    the end of the prompt rendered with the generation prompt to the end of the turn."""
    render = lambda msgs, gen: list(tokenizer.apply_chat_template(  # noqa: E731
        msgs, tokenize=True, return_dict=True, add_generation_prompt=gen, **with_tools)["input_ids"])
    ids = render(messages, False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            start = len(render(messages[:i], True)) if i else 0
            end = min(len(render(messages[: i + 1], False)), len(ids))
            # The turn ends at its eos; separators the template adds after it carry no loss.
            eos = [j for j in range(start, end) if ids[j] == tokenizer.eos_token_id]
            end = eos[0] + 1 if eos else end
            for j in range(start, end):
                mask[j] = 1
    return ids, mask


def join_prompt_completion(prompt: Any, completion: Any):
    """Conversational prompt/completion (lists of messages) become one chat."""
    if isinstance(prompt, list) and isinstance(completion, list):
        return prompt + completion
    return None


def lm_encoder(fmt: str, tokenizer, loss_on_targets_only: bool) -> Callable[[Dict[str, Any]], Dict[str, List[int]]]:
    """The encoder for one format; ``loss_on_targets_only`` is SFT's assistant/completion-only loss."""

    def encode(row: Dict[str, Any]) -> Dict[str, List[int]]:
        if fmt == "text":
            return encode_text(tokenizer, row["text"])
        if fmt == "chat":
            return encode_chat(tokenizer, row["messages"], loss_on_targets_only, _tools(row))
        chat = join_prompt_completion(row["prompt"], row["completion"])
        if chat is not None:
            tools = _tools(row)
            enc = encode_chat(tokenizer, chat, loss_on_targets_only, tools)
            if loss_on_targets_only:  # the completion alone: the prompt's own assistant turns were trained too
                asked = common_prefix_length(enc["input_ids"], render_prompt(tokenizer, row["prompt"], tools))
                enc["labels"] = [IGNORE_INDEX] * asked + enc["labels"][asked:]
            return enc
        return encode_prompt_completion(tokenizer, str(row["prompt"]), str(row["completion"]), loss_on_targets_only)

    return encode


def _tools(row: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    """The row's tools for the chat template (checked by llmexp.data.rows before encoding)."""
    from llmexp.tool_use import tools_of

    return tools_of(row.get("tools"))


def common_prefix_length(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render_prompt(tokenizer, prompt: Any, tools: Optional[List[Dict[str, Any]]] = None) -> List[int]:
    """Token ids of a prompt as the model sees it before answering: chat prompts with the
    template's generation prompt (and the conversation's ``tools``), plain strings as they are."""
    if isinstance(prompt, list):
        from llmexp.tool_use import as_the_template_reads

        return list(tokenizer.apply_chat_template(as_the_template_reads(prompt, tokenizer.chat_template),
                                                  tokenize=True, return_dict=True, add_generation_prompt=True,
                                                  **({"tools": tools} if tools else {}))["input_ids"])
    return _ids(tokenizer, str(prompt))


def render_prompt_response(tokenizer, prompt: Any, response: Any,
                           tools: Optional[List[Dict[str, Any]]] = None) -> List[int]:
    """Token ids of a prompt followed by a response (messages, or strings ending with eos)."""
    if isinstance(prompt, list):
        from llmexp.tool_use import as_the_template_reads

        messages = response if isinstance(response, list) else [{"role": "assistant", "content": str(response)}]
        return list(tokenizer.apply_chat_template(as_the_template_reads(prompt + messages, tokenizer.chat_template),
                                                  tokenize=True, return_dict=True,
                                                  **({"tools": tools} if tools else {}))["input_ids"])
    return _ids(tokenizer, str(prompt) + str(response)) + [tokenizer.eos_token_id]


def encode_preference(tokenizer, prompt: Any, chosen: Any, rejected: Any,
                      tools: Optional[List[Dict[str, Any]]] = None) -> Dict[str, List[int]]:
    """Prompt+chosen and prompt+rejected, labelled from where they leave the shared prompt.

    As TRL's DPOTrainer tokenizes: the completion starts where the rendered prompt and
    prompt+response diverge, so the same data gives the same tokens in both.
    """
    prompt_ids = render_prompt(tokenizer, prompt, tools)
    chosen_ids = render_prompt_response(tokenizer, prompt, chosen, tools)
    rejected_ids = render_prompt_response(tokenizer, prompt, rejected, tools)
    start = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    eos = tokenizer.eos_token_id
    return {"input_ids": chosen_ids, "labels": completion_labels(chosen_ids, start, eos),
            "rejected_input_ids": rejected_ids, "rejected_labels": completion_labels(rejected_ids, start, eos)}


def completion_labels(ids: List[int], start: int, eos: Optional[int]) -> List[int]:
    """Labels of a response from ``start`` to its last eos: what a template writes after it (ChatML's
    newline after <|im_end|>) is no answer's, and the model never emits it (as SFT's mask ends at
    eos); with that newline labelled, a Qwen SFT's chosen answers started DPO at 1.66 nats, not 0.006."""
    end = next((j + 1 for j in range(len(ids) - 1, start - 1, -1) if ids[j] == eos), len(ids))
    return [IGNORE_INDEX] * start + ids[start:end] + [IGNORE_INDEX] * (len(ids) - end)


def preference_encoder(tokenizer) -> Callable[[Dict[str, Any]], Dict[str, List[int]]]:
    return lambda row: encode_preference(tokenizer, row["prompt"], row["chosen"], row["rejected"], _tools(row))


def unpaired_encoder(tokenizer, fmt: str) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    """kto: a completion and whether it is desirable; a preference row gives both of its answers,
    the chosen one desirable (collate_unpaired makes them two completions)."""

    def encode(row: Dict[str, Any]) -> Dict[str, Any]:
        tools = _tools(row)
        if fmt == "preference":
            return {**encode_preference(tokenizer, row["prompt"], row["chosen"], row["rejected"], tools),
                    "desirable": True}
        prompt_ids = render_prompt(tokenizer, row["prompt"], tools)
        ids = render_prompt_response(tokenizer, row["prompt"], row["completion"], tools)
        start = common_prefix_length(prompt_ids, ids)
        return {"input_ids": ids, "labels": completion_labels(ids, start, tokenizer.eos_token_id),
                "desirable": bool(row["label"])}

    return encode


def prompt_encoder(tokenizer, tools: Optional[List[Dict[str, Any]]] = None
                   ) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    """Rollout stages: the rendered prompt ids (with the ``tools`` the policy may call), the prompt
    itself (a reward model re-renders prompt + response with its own tokenizer) and the row's other
    columns (for reward functions)."""

    def encode(row: Dict[str, Any]) -> Dict[str, Any]:
        row = as_prompt_row(row)
        return {"input_ids": render_prompt(tokenizer, row["prompt"], tools), "prompt": row["prompt"],
                "columns": {k: v for k, v in row.items() if k != "prompt"}}

    return encode


def as_prompt_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """A chat row as a rollout prompt: the conversation before its last assistant turn, and that
    turn's text as ``completion`` (the reference answer a reward function may compare with, as a
    prompt/completion row's); other rows as they are."""
    if "prompt" in row and "chosen" in row and "completion" not in row:  # a preference pair: its chosen answer
        return {**row, "completion": row["chosen"]}
    if "prompt" in row and "label" in row and not row["label"]:  # kto's undesirable completion is no reference
        return {k: v for k, v in row.items() if k != "completion"}
    if "prompt" in row or "messages" not in row:
        return row
    messages = list(row["messages"])
    others = {k: v for k, v in row.items() if k != "messages"}
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if not last:  # no answer (or nothing before it): the conversation is the prompt
        return {**others, "prompt": messages}
    return {**others, "prompt": messages[:last], "completion": messages[last].get("content")}
