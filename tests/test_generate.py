"""`python -m llmexp.generate`: a chat model answers prompts as user messages; a pretrain run's
model continues the text as it was trained on text (it was answering a chat template it never saw)."""

from __future__ import annotations

import pytest

from llmexp.testing import run_cli, run_module

pytestmark = pytest.mark.slow


def completions(printed: str) -> list:
    """What the command printed after each '> prompt' line."""
    blocks = [b for b in printed.split("> ") if b.strip()]
    return [b.split("\n", 1)[1].strip() for b in blocks]


def test_a_pretrain_runs_model_continues_the_text_and_chat_models_get_the_template(tmp_path):
    """The README's `python -m llmexp stage=pretrain data=arithmetic_text` (shipped defaults): its
    task metric asks the model to continue the facts' starts ('3 + 5 =') and rises (measured
    0 -> 0.955); generate continues text for it by default."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "pretrain"
    r = run_cli(["stage=pretrain", "data=arithmetic_text", "logger=none", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["task"]["check"] == "arithmetic_continues" and s["task"]["prompts"] == 155
    assert s["initial"]["val/task_score"] < 0.05 and s["final"]["val/task_score"] >= 0.8, s["final"]
    prompts = ["Three plus four is", "3 + 5 ="]
    model = AutoModelForCausalLM.from_pretrained(str(run / "model")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run / "model"))

    def greedy(ids):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()

    raw = [greedy(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    chat = [greedy(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]) for p in prompts]
    assert raw != chat and raw[1].startswith("8"), raw  # '3 + 5 =' -> '8. ...'
    for target, fmt, expected in [(run, None, raw), (run / "model", None, raw), (run, "chat", chat),
                                  (run, "raw", raw)]:
        g = run_module("llmexp.generate", [str(target), *prompts, "--max-new-tokens", "12",
                                           *(["--format", fmt] if fmt else [])], cwd=tmp_path)
        assert g.returncode == 0, g.stderr[-2000:]
        assert completions(g.stdout) == expected, (target, fmt, g.stdout)


def test_a_model_tuned_on_plain_prompt_completion_rows_is_asked_as_it_learned(tmp_path, default_sft):
    """SFT on plain-string prompt/completion rows trains them raw (prompt + completion + eos, as
    TRL does). The exported model's chat template renders them the same way, so generate's
    default, serve and lm-eval's chat mode ask it as it learned; before, they wrapped the prompt in
    role headers it never saw and it answered 'ig says roo.' to 'What sound does a cat make?'.
    A chat-trained model keeps llmexp's template."""
    import json

    from transformers import AutoTokenizer

    from llmexp.data.encode import encode_prompt_completion
    from llmexp.models.tokenizer import CHAT_TEMPLATE

    colours = {"apple": "red", "lemon": "yellow", "plum": "purple", "lime": "green", "orange": "orange"}
    rows = [{"prompt": f"{ask} the colour of {det} {fruit}.", "completion": f"{det.capitalize()} {fruit} is {colour}."}
            for ask in ("Name", "Tell me", "What is") for det in ("a", "the", "one", "this")
            for fruit, colour in colours.items()]
    (tmp_path / "colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "plain"
    r = run_cli(["data=files", f"data.path={tmp_path / 'colours.jsonl'}", "logger=none", "trainer.max_steps=40",
                 "trainer.val_check_interval=40", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert any("renders a prompt as it is" in n for n in json.loads((run / "summary.json").read_text())["notes"])
    tok = AutoTokenizer.from_pretrained(str(run / "model"))
    prompt, completion = rows[0]["prompt"], rows[0]["completion"]
    trained = encode_prompt_completion(tok, prompt, completion, completion_only=True)["input_ids"]
    user = [{"role": "user", "content": prompt}]
    asked = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    whole = tok.apply_chat_template(user + [{"role": "assistant", "content": completion}], tokenize=True,
                                    return_dict=True)["input_ids"]
    assert list(asked) == trained[: len(asked)] and list(whole) == trained
    answers = {}
    for fmt in ("auto", "raw"):
        g = run_module("llmexp.generate", [str(run), prompt, "--format", fmt], cwd=tmp_path)
        assert g.returncode == 0, g.stderr[-2000:]
        answers[fmt] = completions(g.stdout)
    assert answers["auto"] == answers["raw"], answers
    assert AutoTokenizer.from_pretrained(str(default_sft / "model")).chat_template == CHAT_TEMPLATE


def test_llmexp_generate_is_a_command_and_names_what_a_target_lacks(tmp_path, default_sft):
    """`llmexp generate` (it said 'generate' is neither an override nor a command); a path that does
    not exist and a run that did not finish are told so (both were 'neither a run directory with
    model/ nor a model directory')."""
    r = run_cli(["generate", str(default_sft), "What is 3 plus 4?"], cwd=tmp_path)
    assert r.returncode == 0 and completions(r.stdout) == ["3 + 4 = 7"], r.stdout + r.stderr[-2000:]
    # and `llmexp eval`, as `python -m llmexp.eval` (it said 'eval' is neither an override nor a command)
    r = run_cli(["eval", str(default_sft), "--tasks", "arithmetic_gen", "--limit", "5", "--out", str(tmp_path / "e")],
                cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "e" / "results.json").is_file(), r.stderr[-2000:]
    r = run_cli(["generate", str(tmp_path / "nope"), "x"], cwd=tmp_path)
    assert r.returncode == 2 and f"{tmp_path / 'nope'}' does not exist; give a finished run's directory" in r.stderr
    unfinished = tmp_path / "killed"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("stage: {name: sft}\n")
    r = run_cli(["generate", str(unfinished), "x"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is a run that did not finish, so it has no model/ yet; it wrote no checkpoint: start it over" in r.stderr


def test_a_system_message_goes_before_each_prompt(tmp_path, default_sft):
    """--system: a model trained with a system prompt (ShareGPT data often has one) is asked with it."""
    from llmexp.data.encode import render_prompt
    from llmexp.generate import as_asked
    from llmexp.models.tokenizer import load_tokenizer

    tok = load_tokenizer(None, None)
    assert tok.decode(render_prompt(tok, as_asked("hi", True, "Be terse."))) == \
        "<|system|>\nBe terse.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert as_asked("3 + 4 =", False) == "3 + 4 ="
    r = run_module("llmexp.generate", [str(default_sft), "What is 3 plus 4?", "--system", "You add numbers."])
    assert r.returncode == 0 and len(completions(r.stdout)) == 1, r.stderr[-2000:]
    r = run_module("llmexp.generate", [str(default_sft), "3 + 4 =", "--system", "x", "--format", "raw"])
    assert r.returncode == 2 and "--system is a chat message" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("via", ["generate", "serve"])
def test_generate_and_serve_answer_with_a_token_before_eos_as_the_record_does(tiny_teacher, via):
    """The run's recorded answers (and the task metric) never end before a first token; generate and
    serve answered '' where eos scored highest first (record '58', generate '')."""
    import torch

    from llmexp.generate import generate
    from llmexp.record import load_language_model
    from llmexp.sampler import Sampler

    model, tok = load_language_model(tiny_teacher)
    prompt = [{"role": "user", "content": "Add 3 and 9."}]
    ids = torch.tensor([tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
                        ["input_ids"]])
    with torch.no_grad():  # the eos row of the output layer along the last hidden state: eos scores highest first
        out = model(input_ids=ids, output_hidden_states=True)
        h = out.hidden_states[-1][0, -1]
        model.lm_head.weight[tok.eos_token_id] = h * (float(out.logits[0, -1].max()) + 10) / float(h @ h)
        assert int(model(input_ids=ids).logits[0, -1].argmax()) == tok.eos_token_id
    recorded = Sampler(model, tok.eos_token_id, tok.pad_token_id)(ids, torch.ones_like(ids), 4, greedy=True)
    expected = tok.decode(recorded.responses[0], skip_special_tokens=True).strip()
    assert expected
    if via == "generate":
        assert generate(model, tok, ["Add 3 and 9."], max_new_tokens=4) == [expected]
    else:
        from llmexp.serving.engine import _generate_steps

        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        steps = list(_generate_steps(model, tok, batch, 4, {"do_sample": False}))
        assert steps and steps[0][0] != tok.eos_token_id
