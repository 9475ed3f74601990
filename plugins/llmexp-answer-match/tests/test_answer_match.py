"""llmexp-answer-match through llmexp itself: the reward and the eval, looked up by name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmexp.errors import ConfigError
from llmexp.plugins.evaluation import eval_options
from llmexp.plugins.registry import evals, rewards
from llmexp.testing import tiny_run
from llmexp_answer_match.scoring import closeness, extract_number, is_match


@pytest.mark.parametrize("text,number", [("3 + 4 = 7", 7.0), ("= -2 so", -2.0), ("it is 12 or 13", 13.0),
                                         ("x = 2.5", 2.5), ("no number", None)])
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_closeness_gives_partial_credit():
    assert closeness("3 + 4 = 7", "7") == 1.0
    assert closeness("3 + 4 = 8", "7") == 0.5
    assert closeness("3 + 4 = 11", "7") == pytest.approx(0.2)
    assert closeness("seven", "7") == 0.0
    assert is_match("= 7", "7") and not is_match("= 8", "7")


def test_reward_and_eval_are_registered_by_name_from_the_entry_point():
    entry = rewards()["answer_closeness"]
    assert (entry.owner.distribution, entry.owner.version) == ("llmexp-answer-match", "0.1.0")
    assert entry.declaration.fn("5 - 2 = 4", answer="3", prompt=[]) == 0.5
    assert evals()["answer_match"].owner.name == "answer_match"


def test_eval_options_are_typed_and_checked():
    o = eval_options("answer_match", {"num_samples": "7"})
    assert (o.num_samples, o.dataset, o.max_new_tokens) == (7, "arithmetic_prompts", 12)
    with pytest.raises(ConfigError) as e:
        eval_options("answer_match", {"num_sample": 3, "max_new_tokens": 0})
    assert "unknown option 'num_sample' for eval 'answer_match'" in str(e.value)
    assert "did you mean 'num_samples'" in str(e.value)
    assert "eval.answer_match.options.max_new_tokens: must be >= 1, got 0" in str(e.value)


@pytest.mark.slow
def test_train_then_evaluate_by_name(tmp_path):
    run_dir = tmp_path / "run"
    tiny_run(run_dir)  # sft on llmexp's bundled arithmetic chat data
    code = ("import json, sys\nfrom pathlib import Path\nfrom llmexp.plugins.evaluation import evaluate_model_dir\n"
            "m = evaluate_model_dir('answer_match', Path(sys.argv[1]) / 'model', {'num_samples': 12}, "
            "run_dir=Path(sys.argv[1]))\nprint(json.dumps(m))")
    r = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    details = [json.loads(line) for line in (run_dir / "answer_match.jsonl").read_text().splitlines()]
    assert len(details) == 12 and metrics["answer_match/samples"] == 12
    assert metrics["answer_match/accuracy"] == pytest.approx(sum(d["match"] for d in details) / 12)
    assert metrics["answer_match/closeness"] == pytest.approx(sum(d["closeness"] for d in details) / 12)
    for d in details:
        assert d["closeness"] == closeness(d["completion"], d["answer"])
