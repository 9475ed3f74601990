"""Evaluation with real lm-eval runs on the bundled offline tasks, a custom task dir, bad tasks."""

from __future__ import annotations

from pathlib import Path

import json

import pytest
from llmexp.testing import run_cli, run_module
REPO = Path(__file__).resolve().parents[1]

from llmexp.record import read_metrics


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """The default SFT run with lm-eval before, during (every 300 steps) and after training."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    r = run_cli(["eval=lm_eval", "eval.limit=60", "eval.every_n_steps=300", "logger=csv",
                 "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_bundled_tasks_score_higher_after_sft(evaluated_run):
    s = json.loads((evaluated_run / "summary.json").read_text())
    before, after = s["eval_initial"], s["eval"]
    assert set(after) == {"arithmetic_mc", "arithmetic_gen", "arithmetic_ppl"}
    assert after["arithmetic_gen"]["samples"] == before["arithmetic_mc"]["samples"] == 60  # eval.limit
    # Measured: mc accuracy 0.18 -> 1.0, exact match 0.0 -> 0.98, F1 0.004 -> 0.99 (60 questions each).
    assert before["arithmetic_mc"]["acc"] < 0.5 and after["arithmetic_mc"]["acc"] >= 0.9
    assert before["arithmetic_gen"]["exact_match"] == 0.0 and after["arithmetic_gen"]["exact_match"] >= 0.8
    assert after["arithmetic_gen"]["f1"] > before["arithmetic_gen"]["f1"] + 0.3
    # Held-out plain text: SFT on chat data does not teach it (perplexity is recorded, not improved).
    assert after["arithmetic_ppl"]["bits_per_byte"] > 0 and after["arithmetic_ppl"]["word_perplexity"] > 1


@pytest.mark.slow
def test_results_files_and_logged_metrics_are_complete(evaluated_run):
    s = json.loads((evaluated_run / "summary.json").read_text())
    results = json.loads((evaluated_run / "eval" / "results.json").read_text())
    assert results == s["eval"]
    assert json.loads((evaluated_run / "eval" / "initial.json").read_text()) == s["eval_initial"]
    rows = [r for r in read_metrics(evaluated_run / "metrics.csv") if "eval/arithmetic_gen/exact_match" in r]
    # before training (row 0, as the validation before it), during it; the eval after it reuses step 600's
    assert [int(r["step"]) for r in rows] == [0, 300, 600]
    assert float(rows[0]["eval/arithmetic_gen/exact_match"]) == s["eval_initial"]["arithmetic_gen"]["exact_match"]
    # The validations at the same steps (Lightning's own index put them at 199, 399 and 599), and
    # the training rows at the steps done (10, 20, ..., 600).
    val_steps = [int(r["step"]) for r in read_metrics(evaluated_run / "metrics.csv") if "val/loss" in r]
    assert val_steps == [0, 200, 400, 600], val_steps
    train_steps = [int(r["step"]) for r in read_metrics(evaluated_run / "metrics.csv") if "train/loss" in r]
    assert train_steps == list(range(10, 601, 10)), train_steps


@pytest.mark.slow
def test_eval_of_an_existing_run_and_a_custom_task_dir(evaluated_run, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "pick.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {a} plus {b}?", "choices": [f"{a} + {b} = {a + b}",
                                                                                   f"{a} + {b} = {a + b + 1}"],
                                        "label": 0}) + "\n" for a in range(5) for b in range(4)))
    (tasks / "pick.yaml").write_text(
        f"task: pick_sum\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")
    out = tmp_path / "out"
    r = run_module("llmexp.eval", [f"run={evaluated_run}", "--tasks", "pick_sum,arithmetic_gen",
                                   "--include-path", str(tasks), "--limit", "20", "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # Outside a git repository lm-eval's commit lookup printed git's "fatal: not a git repository",
    # and HFLM its notes on being handed a model object: none of it is the user's business.
    for noise in ("fatal:", "already-initialized model", "is not of type `str`", "specified through cli"):
        assert noise not in r.stderr, (noise, r.stderr[-2000:])
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"pick_sum", "arithmetic_gen"}
    assert results["pick_sum"]["acc"] >= 0.9
    # --limit is in the record: compare showed a 20-document eval as one of the whole task
    assert results["pick_sum"]["samples"] == results["arithmetic_gen"]["samples"] == 20
    g = run_module("llmexp.generate", [str(evaluated_run), "What is 3 plus 4?"], cwd=tmp_path)
    assert g.returncode == 0 and "3 + 4 = 7" in g.stdout


def test_unknown_task_is_refused_before_training(tmp_path):
    r = run_cli(["eval=lm_eval", "eval.tasks=[arithmetic_mcq]"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "eval.tasks: unknown task 'arithmetic_mcq'" in r.stderr and "did you mean 'arithmetic_mc'" in r.stderr
    assert not (tmp_path / "runs").exists()
    r = run_module("llmexp.eval", [str(tmp_path), "--tasks", "nope"], cwd=REPO)
    assert r.returncode == 2 and "unknown task 'nope'" in r.stderr


@pytest.mark.slow
def test_a_plugin_eval_runs_in_the_eval_group(tmp_path):
    from plugin_packages import ensure_installed

    ensure_installed()
    run_dir = tmp_path / "run"
    r = run_cli(["eval.name=answer_match", "trainer.max_steps=30", "trainer.val_check_interval=30",
                 "eval.every_n_steps=30", "logger=csv", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["eval"]["answer_match"]["samples"] == s["eval_initial"]["answer_match"]["samples"] == 50
    assert s["eval"]["answer_match"]["closeness"] > s["eval_initial"]["answer_match"]["closeness"]
    # Its per-prompt details are the trained model's: with an eval in training at the last step
    # (every_n_steps), they were left as the untrained model's while results.json was the trained one's.
    details = [json.loads(line) for line in (run_dir / "answer_match.jsonl").read_text().splitlines()]
    assert sum(d["closeness"] for d in details) / len(details) == pytest.approx(s["eval"]["answer_match"]["closeness"])
    rows = [int(r["step"]) for r in read_metrics(run_dir / "metrics.csv") if "eval/answer_match/closeness" in r]
    assert rows == [0, 30], rows  # the eval after training is not logged at step 30 twice
    r = run_cli(["eval.name=answer_matsh"], cwd=tmp_path)
    assert r.returncode == 2 and "did you mean 'answer_match'" in r.stderr
    # --limit cuts lm-eval tasks only: it was silently ignored for a plugin's eval
    r = run_module("llmexp.eval", [str(run_dir), "--tasks", "answer_match", "--limit", "5"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--limit: applies to lm-eval tasks only, and 'answer_match' is a registered eval" in r.stderr
    r = run_module("llmexp.eval", [str(run_dir), "--limit", "5"], cwd=tmp_path)  # the run's own eval=answer_match
    assert r.returncode == 2 and "--limit: applies to lm-eval tasks only" in r.stderr
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["initial.json", "results.json"]
    # evaluated again: its details beside its results (they were written over the run's own)
    before = (run_dir / "answer_match.jsonl").read_text()
    r = run_module("llmexp.eval", [str(run_dir), "--tasks", "answer_match"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run_dir / "answer_match.jsonl").read_text() == before
    again = json.loads((run_dir / "eval" / "results-2.json").read_text())["answer_match"]
    details = [json.loads(line) for line in (run_dir / "eval" / "results-2" / "answer_match.jsonl").read_text().splitlines()]
    assert len(details) == again["samples"] == 50 and again["closeness"] == s["eval"]["answer_match"]["closeness"]


def test_a_plugin_eval_returning_nan_is_refused():
    """NaN was recorded, and results.json got a bare NaN that strict JSON readers refuse."""
    from llmexp.plugins.errors import PluginError
    from llmexp.plugins.evaluation import _checked
    from llmexp.plugins.manager import BUILTIN

    with pytest.raises(PluginError, match=r"eval 'mine' returned non-finite metrics \{'exact_match': nan\}"):
        _checked("mine", {"exact_match": float("nan"), "n": 3}, BUILTIN)
    assert _checked("mine", {"exact_match": 0.5, "n": 3}, BUILTIN) == {"mine/exact_match": 0.5, "mine/n": 3.0}


def test_lm_eval_draws_no_progress_bars_into_logs(tiny_teacher, capsys):
    """lm-eval's "Running loglikelihood requests" tqdm bars filled sweep trials' logs and runs with
    trainer.progress_bar=false; they are drawn only when asked and on a terminal (here: neither)."""
    from llmexp.config.schema import EvalConfig
    from llmexp.evals.lm_eval_bridge import run_lm_eval
    from llmexp.record import load_language_model

    from tqdm import tqdm

    original = tqdm.__dict__["__init__"]
    model, tokenizer = load_language_model(tiny_teacher)
    table = run_lm_eval(model, tokenizer, EvalConfig(name="lm_eval", tasks=["arithmetic_mc"], limit=4), progress=False)
    assert 0 <= table["arithmetic_mc"]["acc"] <= 1
    assert table["arithmetic_mc"]["samples"] == 4  # a result on 4 documents says so (eval.limit)
    err = capsys.readouterr().err
    assert "it/s]" not in err and "Running loglikelihood" not in err, err[-2000:]
    assert tqdm.__dict__["__init__"] is original  # put back
