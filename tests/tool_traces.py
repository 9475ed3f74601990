"""Data for tests of tool use and reasoning: the bundled skill's questions answered by calling
llmexp's calculator tool and reasoning on its result before answering, and a chat template that
writes the calls as Qwen2.5 does (and reads no reasoning: llmexp writes it into the answer)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from test_tool_use import TOJSON

# Qwen2.5's way of writing a call (test_tool_use.TOJSON), the tools named in a system turn (their
# whole schemas tripled the prompts, and a tiny model took three times the steps to answer after a result)
TOOLS_BY_NAME = TOJSON.replace("You may call: {% for t in tools %}{{ t | tojson }}{% endfor %}",
                               "Tools: {% for t in tools %}{{ t.function.name }} {% endfor %}")


def calculator_schema():
    from transformers.utils import get_json_schema

    from llmexp.plugins.builtin import calculator

    schema = get_json_schema(calculator)
    schema["function"].pop("return", None)
    return schema


def call_traces(n: int, seed: int = 0):
    """The skill's questions answered by calling the calculator, then, reasoning on its result,
    restating it, as a tool-using reasoning dataset keeps them (OpenAI's tool_calls, the tool's
    message, the answer's reasoning_content, a tools column)."""
    from llmexp.data.skill import _sample

    rng, tools = random.Random(seed), json.dumps([calculator_schema()])
    for _ in range(n):
        p = _sample(rng, 9)
        call = {"type": "function", "function": {"name": "calculator",
                                                 "arguments": json.dumps({"expression": f"{p.a} {p.op} {p.b}"})}}
        yield {"messages": [{"role": "user", "content": p.question(rng.randrange(4))},
                            {"role": "assistant", "content": "", "tool_calls": [call]},
                            {"role": "tool", "content": str(p.answer)},
                            {"role": "assistant", "content": p.solution(),
                             "reasoning_content": f"The calculator says {p.answer}."}], "tools": tools}


def prompt_rows(n: int, seed: int = 1):
    """Rollout prompts of the skill with their solutions."""
    from llmexp.data.skill import _sample

    rng = random.Random(seed)
    for _ in range(n):
        p = _sample(rng, 9)
        yield {"prompt": [{"role": "user", "content": p.question(rng.randrange(4))}], "solution": p.solution()}


def build_calculator_sft(root: Path) -> None:
    """root/sft: the default model taught to call the calculator and reason on its result (the
    shipped SFT on 600 traces, with a tokenizer trained on them so that a call is a few dozen
    tokens); root/prompts.jsonl: prompts for a rollout stage."""
    from llmexp.testing import run_cli

    root.mkdir(parents=True)
    (root / "calls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in call_traces(600)))
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(200)))
    (root / "tools.jinja").write_text(TOOLS_BY_NAME)
    r = run_cli(["logger=none", "trainer.progress_bar=false", "data=files", f"data.path={root / 'calls.jsonl'}",
                 f"model.chat_template={root / 'tools.jinja'}", "model.tokenizer=train",
                 f"hydra.run.dir={root / 'sft'}"], cwd=root, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
