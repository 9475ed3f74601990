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
