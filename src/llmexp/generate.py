"""Generate from a run: load its exported model and answer prompts with the chat template applied
(or, for a pretrain run, continue the text as it is).

    python -m llmexp.generate runs/sft-llama/<time> "What is 3 plus 4?" "Add 2 and 5."
    python -m llmexp.generate path/to/model "Tell me a story" --max-new-tokens 64 --temperature 0.8
    python -m llmexp.generate runs/pretrain-llama/<time> "Three plus four is"      # continues the text
    python -m llmexp.generate runs/grpo-llama/<time> "What is 37 times 12?" --tools calculator

A run trained with tools (stage.rollout.tools) is asked with them by default: its calls run and
their results are shown, as it was trained and scored.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, List, Optional

from llmexp.argtypes import command_summary
from llmexp.argtypes import non_empty_text, non_negative_float, positive_int
from llmexp.errors import UserError, quiet_exits, report


def generate(model, tokenizer, prompts: List[str], max_new_tokens: int = 32, temperature: float = 0.0,
             chat: bool = True, system: Optional[str] = None) -> List[str]:
    """Each prompt's completion: the answer to it as a user message (``chat``; after ``system``'s
    message when given), or the text's continuation, tokenized as the pretrain stage tokenizes text."""
    import torch

    from llmexp.data.collate import collate_prompts
    from llmexp.data.encode import render_prompt

    try:
        rows = [{"input_ids": render_prompt(tokenizer, as_asked(p, chat, system)), "prompt": p, "columns": {}}
                for p in prompts]
    except Exception as e:  # noqa: BLE001 - the template's own refusal (no system role, say): a traceback
        if isinstance(e, UserError):
            raise
        raise UserError(f"{'--system' if system else 'prompt'}: the model's chat template cannot render it "
                        f"({str(e).splitlines()[0]})" + ("; leave out --system" if system else "")) from None
    context = getattr(model.config, "max_position_embeddings", None)
    for prompt, row in zip(prompts, rows):
        if context and len(row["input_ids"]) + max_new_tokens > context:
            raise UserError(f"prompt {prompt[:40]!r}... is {len(row['input_ids'])} tokens; with --max-new-tokens "
                            f"{max_new_tokens} it exceeds the model's context of {context} tokens; shorten it or "
                            f"lower --max-new-tokens")
    batch = collate_prompts(rows, tokenizer.pad_token_id)
    ids = batch["prompt_ids"]
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        # at least one token, as the run's recorded answers and task metric are generated (llmexp.sampler)
        out = model.generate(input_ids=ids, attention_mask=batch["prompt_mask"], max_new_tokens=max_new_tokens,
                             min_new_tokens=1, pad_token_id=tokenizer.pad_token_id, **sampling)
    return [tokenizer.decode(o[ids.shape[1]:], skip_special_tokens=True).strip() for o in out]


TOOL_TURN_TOKENS = 64


def answer_with_tools(model, tokenizer, prompts: List[str], names: List[str], max_new_tokens: int,
                      temperature: float = 0.0, system: Optional[str] = None) -> List[str]:
    """Each prompt's exchange with the tools (llmexp.tool_rollout): every call and its result, then
    the answer after the last one, as the run's rollouts and task metric had it."""
    from llmexp.data.collate import collate_prompts
    from llmexp.data.encode import render_prompt
    from llmexp.sampler import Sampler
    from llmexp.serving.tool_calls import response_template
    from llmexp.tool_rollout import load_tools, sample_with_tools, tools_problem

    tools = load_tools(names, "--tools")
    problem = tools_problem(tokenizer, model.config)
    if problem:
        raise UserError(f"--tools: {problem}")
    schemas = [t.schema for t in tools]
    batch = collate_prompts([{"input_ids": render_prompt(tokenizer, as_asked(p, True, system), schemas), "prompt": p,
                              "columns": {}} for p in prompts], tokenizer.pad_token_id)
    engine = Sampler(model.eval(), tokenizer.eos_token_id, tokenizer.pad_token_id)
    sampling = {"temperature": temperature} if temperature > 0 else {"greedy": True}
    turns = sample_with_tools(engine, tokenizer, response_template(tokenizer, model.config), tools,
                              batch["prompt_ids"], batch["prompt_mask"], max_new_tokens, max_calls=4, **sampling).turns
    return ["".join(f"[{c['name']}({c['arguments']}) -> {c['result']}]\n" for c in calls) + answer
            for calls, answer in zip(turns.calls, turns.answers)]


def run_tools(model_dir: Path) -> List[str]:
    """The stage.rollout.tools the run whose model ``model_dir`` is was trained with (none: [])."""
    raw = _run_config(model_dir)
    tools = (((raw.get("stage") or {}).get("rollout") or {}).get("tools") or []) if raw else []
    return [str(t) for t in tools] if isinstance(tools, list) else []


def _run_config(model_dir: Path) -> Optional[dict]:
    import yaml

    from llmexp.record import run_of_model

    run = run_of_model(model_dir)
    config = run.config if run is not None else None
    try:
        raw = yaml.safe_load(config.read_text()) if config is not None and config.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    return raw if isinstance(raw, dict) else None


def run_answer_limit(model_dir: Path) -> Optional[int]:
    """The task.max_new_tokens of the run whose model ``model_dir`` is (its recorded answers' and
    serve's length: generate's own 32 cut a served answer's match short, or went on past it), or None."""
    raw = _run_config(model_dir)
    value = ((raw or {}).get("task") or {}).get("max_new_tokens") if raw else None
    return int(value) if isinstance(value, int) and value > 0 else None


def as_asked(prompt: str, chat: bool, system: Optional[str] = None) -> Any:
    """What the model is given: the prompt as a user message after ``system``'s (chat), or the text itself."""
    if not chat:
        return prompt
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]


def uses_chat(model_dir: Path, tokenizer, fmt: str) -> bool:
    """``--format``: chat or raw as given; auto: the text continued for a pretrain run's model (its
    run record says so) or a tokenizer without a chat template, the chat template otherwise."""
    from llmexp.record import RunDir

    if fmt != "auto":
        return fmt == "chat"
    summary = None
    with contextlib.suppress(ValueError, OSError):
        summary = RunDir(model_dir.parent).summary()
    return (summary or {}).get("stage") != "pretrain" and bool(getattr(tokenizer, "chat_template", None))


@quiet_exits
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmexp.generate", description=command_summary(__doc__))
    ap.add_argument("target", help="a run directory (its model/) or a model directory")
    ap.add_argument("prompts", nargs="+", type=non_empty_text)
    ap.add_argument("--max-new-tokens", type=positive_int, default=None,
                    help="(default: a run's task.max_new_tokens, as its recorded answers and serve; else 32; with "
                         f"tools, each of the model's turns: {TOOL_TURN_TOKENS})")
    ap.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy")
    ap.add_argument("--format", choices=("auto", "chat", "raw"), default="auto",
                    help="chat: each prompt is a user message; raw: the text is continued as it is; auto (default): "
                         "raw for a pretrain run's model, chat otherwise")
    ap.add_argument("--system", type=non_empty_text, default=None,
                    help="a system message before each prompt (chat), e.g. the one the model was trained with")
    ap.add_argument("--tools", nargs="*", default=None, metavar="TOOL",
                    help="functions the model may call (registered names or module:function); their calls run "
                         "and the results are shown (default: the run's stage.rollout.tools; --tools alone: none)")
    args = ap.parse_args(argv)
    if args.system and args.format == "raw":
        ap.error("--system is a chat message; it does not apply to --format raw")
    from llmexp.env import configure_environment

    configure_environment(offline=True)
    try:
        from llmexp.record import load_language_model, model_dir_of

        model_dir = model_dir_of(args.target)
        model, tokenizer = load_language_model(model_dir)
        chat = uses_chat(model_dir, tokenizer, args.format)
        if args.system and not chat:
            raise UserError(f"--system: {model_dir} is a pretrain run's model, which continues text; "
                            f"drop --system, or pass --format chat")
        tools = run_tools(model_dir) if args.tools is None else args.tools
        # with tools, each of the model's turns: a call is longer than an answer
        limit = args.max_new_tokens or (TOOL_TURN_TOKENS if tools else run_answer_limit(model_dir) or 32)
        if tools and not chat:
            raise UserError("--tools: the model is asked through its chat template with them; drop --format raw")
        completions = (answer_with_tools(model, tokenizer, args.prompts, tools, limit, args.temperature, args.system)
                       if tools else generate(model, tokenizer, args.prompts, limit, args.temperature, chat,
                                              args.system))
    except UserError as e:
        return report(e)
    for prompt, completion in zip(args.prompts, completions):
        print(f"> {prompt}\n{completion}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
