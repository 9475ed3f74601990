"""End to end through installed plugins, by name: train with `python -m llmexp data=acme_qa`, then
evaluate the exported model with the plugin eval `answer_match` — each in a fresh process that
finds the plugins through their entry points."""

from __future__ import annotations

import json

import pytest
import yaml
from llmexp.testing import run_cli, run_module
from plugin_packages import PACKAGES, ensure_installed

from llmexp.data import skill
from llmexp.testing import TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def example_plugins():
    ensure_installed()


def test_train_on_a_plugin_dataset_then_run_a_plugin_eval(tmp_path):
    run_dir = tmp_path / "acme"
    r = run_cli([*TINY, "data=acme_qa", "data.options.answer_style=short", "data.options.topics=[price,colour]",
                 "data.options.sample_questions=2", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["data"], summary["stage"], summary["global_step"]) == ("acme_qa", "sft", 20)
    assert summary["final"]["val/loss"] < summary["initial"]["val/loss"]
    dedup = next(s for s in summary["data_stats"]["preparation"] if s["step"] == "dedup")
    assert dedup["rows_out"] == 16 * 2 * 3  # products x topics x phrasings
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert recorded["options"] == {"num_samples": 2000, "topics": ["price", "colour"], "answer_style": "short",
                                   "sample_questions": 2}
    samples = [json.loads(line) for line in (run_dir / "acme_samples.jsonl").read_text().splitlines()]
    assert [s["expected"] for s in samples] == ["60", "grey"]  # the plugin callback ran in the run

    code = ("import json, sys\nfrom pathlib import Path\nfrom llmexp.plugins.evaluation import evaluate_model_dir\n"
            "run = Path(sys.argv[1])\nprint(json.dumps(evaluate_model_dir('answer_match', run / 'model', "
            "{'num_samples': 6, 'max_new_tokens': 6}, run_dir=run)))")
    script = tmp_path / "evaluate.py"
    script.write_text(code)
    r = run_module(str(script), [str(run_dir)], script=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    details = [json.loads(line) for line in (run_dir / "answer_match.jsonl").read_text().splitlines()]
    assert sorted(metrics) == ["answer_match/accuracy", "answer_match/answered", "answer_match/closeness",
                               "answer_match/samples"]
    assert metrics["answer_match/samples"] == len(details) == 6
    assert metrics["answer_match/accuracy"] == sum(d["match"] for d in details) / 6
    assert metrics["answer_match/answered"] == sum(d["predicted"] is not None for d in details) / 6
    asked = list(skill.prompts_with_answers(num_samples=6, seed=4321))  # the eval's default dataset and seed
    assert [(d["prompt"], d["answer"]) for d in details] == [(a["prompt"][-1]["content"], a["answer"]) for a in asked]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_example_package_end_to_end_tests_pass(package):
    r = run_module("pytest", ["-q", "-m", "slow", "-p", "no:cacheprovider", "tests"], cwd=PACKAGES[package])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 passed" in r.stdout


def test_grpo_rewarded_by_a_plugin_reward_function(tmp_path):
    """`stage.reward.function=answer_closeness` reaches the installed plugin's function by name; the
    recorded held-out reward is its partial credit on the greedy answers, not the 0/1 built-in."""
    run_dir = tmp_path / "grpo"
    r = run_cli(["stage=grpo", "stage.reward.function=answer_closeness", "trainer.max_steps=3",
                 "trainer.micro_batch_size=4", "stage.group_size=2", "optim.warmup_steps=1", "logger=none",
                 "trainer.progress_bar=false", "stage.rollout.max_new_tokens=6", "data.options.num_samples=200",
                 # the plugin's score alone (grpo's default adds -1 to responses that never end)
                 "stage.reward.missing_eos_penalty=null", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["stage"]["reward"]["function"] == "answer_closeness"
    assert 0.0 <= s["final"]["val/reward"] <= 1.0 and "val/reward" in s["initial"]


def test_reward_functions_get_only_the_columns_they_name():
    from llmexp.rewards import FunctionReward

    prompts = [[{"role": "user", "content": "What is 3 plus 4?"}]] * 3
    columns = [{"answer": "7", "chosen": "x", "rejected": "y"}] * 3
    builtin = FunctionReward("arithmetic_correct")(prompts, ["3 + 4 = 7", "3 + 4 = 8", "seven"], columns)
    assert builtin.tolist() == [1.0, 0.0, 0.0]
    plugin = FunctionReward("answer_closeness")
    assert plugin.owner.distribution == "llmexp-answer-match"
    assert plugin(prompts, ["3 + 4 = 7", "3 + 4 = 8", "3 + 4 = 10"], columns).tolist() == [1.0, 0.5, 0.25]
