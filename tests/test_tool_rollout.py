"""Rollouts that call tools (stage.rollout.tools): the policy's calls run, their results written
back as the chat template writes a tool's message, the model answering on; the results out of the
loss, the reward and the task metric on the answer after them."""

from __future__ import annotations

import csv
import json

import pytest

from llmexp.testing import run_cli

from tool_traces import prompt_rows


@pytest.fixture
def tool_sft(calculator_sft):
    """The session's calculator SFT (conftest; tests/tool_traces.py), not to be written into."""
    return calculator_sft


@pytest.mark.slow
def test_a_rollout_is_the_conversation_the_template_renders_with_the_results_out_of_the_loss(tool_sft):
    """The model's call, the calculator's result as the template writes a tool's message, the
    model's answer after it: one sequence, decoded exactly as apply_chat_template renders that
    conversation; the mask that the loss, the KL and the lengths count is 0 exactly on the result's
    tokens; the answer scored is the last turn's."""
    from llmexp.data.collate import collate_prompts
    from llmexp.data.encode import render_prompt
    from llmexp.record import load_language_model
    from llmexp.sampler import Sampler
    from llmexp.serving.tool_calls import response_template
    from llmexp.tool_rollout import load_tools, sample_with_tools
    from llmexp.reasoning import answer_of
    from llmexp.tool_use import as_the_template_reads

    model, tok = load_language_model(tool_sft / "sft" / "model")
    tools = load_tools(["calculator"])
    schemas = [t.schema for t in tools]
    prompts = [r["prompt"] for r in prompt_rows(6)]
    batch = collate_prompts([{"input_ids": render_prompt(tok, p, schemas), "prompt": p, "columns": {}}
                             for p in prompts], tok.pad_token_id)
    engine = Sampler(model, tok.eos_token_id, tok.pad_token_id)
    out = sample_with_tools(engine, tok, response_template(tok, model.config), tools, batch["prompt_ids"],
                            batch["prompt_mask"], 64, max_calls=2, greedy=True)
    turns = out.turns
    called = [i for i, calls in enumerate(turns.calls) if calls]
    assert len(called) >= 4, turns.calls
    for i in called:
        [call] = turns.calls[i]
        assert call["name"] == "calculator" and not call["failed"], call
        expression = json.loads(call["arguments"])["expression"]
        assert call["result"] == str(eval(expression))  # the tool ran on what the model wrote
        conversation = prompts[i] + [
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "calculator", "arguments": call["arguments"]}}]},
            {"role": "tool", "content": call["result"]},
            {"role": "assistant", "content": turns.answers[i]}]
        rendered = tok.apply_chat_template(as_the_template_reads(conversation, tok.chat_template), tools=schemas,
                                           tokenize=False)
        real = int(turns.real_mask[i].sum())
        ids = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist() + out.responses[i, :real].tolist()
        assert tok.decode(ids) == rendered
        results = out.responses[i, :real][turns.model_mask[i, :real] == 0].tolist()
        # (this template's turns follow each other without a newline: jinja's trim_blocks, as transformers renders)
        assert tok.decode(results) == f"<|tool|>\n{call['result']}<|end|><|assistant|>\n"
        assert bool(turns.ended[i]) and turns.model_mask[i, real:].sum() == 0
    assert sum(answer_of(turns.answers[i]) == expression_of(prompts[i]) for i in called) >= 3, turns.answers


def expression_of(prompt) -> str:
    """The solution the skill expects to a prompt's question ('Add 3 and 4.' -> '3 + 4 = 7')."""
    from llmexp.data.skill import QUESTION_TEMPLATES, problems

    question = prompt[-1]["content"]
    for p in problems(9):
        if any(question == t.format(a=p.a, b=p.b) for t in QUESTION_TEMPLATES[p.op]):
            return p.solution()
    raise AssertionError(question)


@pytest.mark.slow
def test_grpo_with_the_calculator_calls_it_scores_the_answers_after_its_results_and_asks_the_task_with_it(
        tool_sft, tmp_path):
    """As a user runs it: the README's command with stage.rollout.tools. The record says how many
    calls each response made and how many failed; the task metric asks the held-out questions with
    the tool and scores the answers after its results."""
    tmp = tmp_path
    r = run_cli(["stage=grpo", f"model.pretrained={tool_sft / 'sft' / 'model'}", "data=files",
                 f"data.path={tool_sft / 'prompts.jsonl'}", "stage.rollout.tools=[calculator]",
                 "stage.reward.function=arithmetic_correct", "stage.rollout.max_new_tokens=64", "task.max_new_tokens=64",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "logger=none",
                 "trainer.progress_bar=false", f"hydra.run.dir={tmp / 'grpo'}"], cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp / "grpo" / "metrics.csv")))
    trained = [row for row in rows if row.get("train/tool_calls")]
    assert trained and all(float(row["train/tool_calls"]) > 0.5 for row in trained), trained
    assert all(0 <= float(row["train/tool_failures"]) < 0.5 for row in trained)
    summary = json.loads((tmp / "grpo" / "summary.json").read_text())
    assert summary["initial"]["val/task_score"] >= 0.5, summary["initial"]  # asked with the calculator
    assert summary["initial"]["val/reward"] >= 0.5  # val/reward likewise
    answers = [json.loads(line) for line in (tmp / "grpo" / "answers.jsonl").read_text().splitlines()]
    right = [a for a in answers if a["score"] == 1.0 and a["step"] == 0]
    assert right and all("<tool_call>" not in a["answer"] and "=" in a["answer"] for a in right), answers[:4]
    from llmexp.generate import run_tools

    assert run_tools(tmp / "grpo" / "model") == ["calculator"]  # what generate asks the run's model with


@pytest.mark.slow
def test_generate_shows_each_call_and_its_result_then_the_answer(tool_sft):
    """A user asking a tool-trained model saw its call as text and nothing more (the call unrun)."""
    r = run_cli(["generate", str(tool_sft / "sft"), "Add 3 and 4.", "--tools", "calculator"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert ('> Add 3 and 4.\n[calculator({"expression": "3 + 4"}) -> 7]\n<think>\nThe calculator says 7.\n</think>\n\n'
            '3 + 4 = 7\n') in r.stdout, r.stdout
    plain = run_cli(["generate", str(tool_sft / "sft"), "Add 3 and 4."])
    assert "[calculator(" not in plain.stdout and "<tool_call>" in plain.stdout  # an SFT run had no tools


@pytest.mark.slow
def test_sft_on_tool_calls_is_asked_its_task_with_the_conversations_tools(tool_sft):
    """The task metric of an SFT on rows with a tools column asked the held-out conversations
    without their tools (the system turn naming them left out): 0.06 while the model answered them."""
    summary = json.loads((tool_sft / "sft" / "summary.json").read_text())
    assert summary["final"]["val/task_score"] >= 0.8, summary["final"]


@pytest.mark.parametrize("overrides, says", [
    (["stage=ppo", "stage.rollout.tools=[calculator]"], "stage=ppo samples without tools"),
    (["stage=grpo", "stage.rollout.tools=[calculater]"], "did you mean 'calculator'"),
    (["stage=grpo", "stage.rollout.tools=[no_such_module:f]"], "no module 'no_such_module'"),
])
def test_tools_a_stage_cannot_run_or_that_do_not_exist_are_refused_before_anything_loads(tmp_path, overrides, says):
    r = run_cli([*overrides, "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "stage.rollout.tools" in r.stderr


def test_a_template_that_cannot_show_tools_is_refused_before_training(tmp_path):
    """llmexp's own template renders neither tools nor calls: the model could not be shown them."""
    r = run_cli(["stage=grpo", "stage.rollout.tools=[calculator]", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
                cwd=tmp_path)
    assert r.returncode == 2 and "stage.rollout.tools: the chat template does not render tools" in r.stderr, \
        r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "model").exists()


def test_a_tool_without_a_description_is_refused_naming_the_fix(tmp_path, monkeypatch):
    from llmexp.errors import UserError
    from llmexp.tool_rollout import load_tools

    (tmp_path / "my_tools.py").write_text("def lookup(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="'my_tools:lookup' of module my_tools cannot be described .* type hint"):
        load_tools(["my_tools:lookup"])


def test_a_failing_call_gets_its_error_as_the_result_as_trl_gives_it():
    from llmexp.tool_rollout import load_tools, run_call

    tools = {t.name: t for t in load_tools(["calculator"])}
    call = lambda name, args: {"function": {"name": name, "arguments": args}}  # noqa: E731
    assert run_call(tools, call("calculator", '{"expression": "37 * (2 + 5)"}')) == ("259", False)
    assert run_call(tools, call("calculator", '{"expression": "__import__(\'os\')"}'))[0].startswith(
        "error: ValueError: not arithmetic")
    assert run_call(tools, call("search", "{}")) == ("error: no tool named 'search' (the tools: calculator)", True)
    assert run_call(tools, call("calculator", "{oops"))[1] and run_call(tools, call("calculator", "[1]"))[1]
    assert run_call(tools, call("calculator", '{"expr": "1"}'))[0].startswith("error: TypeError")


def test_plugins_list_the_calculator_tool():
    from llmexp.plugins.listing import inventory

    [own] = [p for p in inventory()["plugins"] if p["name"] == "llmexp"]
    assert own["tools"] == ["calculator"]
