"""Post-training as a user runs it: the README's commands with the shipped defaults only (no lr,
steps or batch overrides; hydra.run.dir only says where the record goes), judged by the task
metric (greedy exact match on the skill's 155 questions in their four wordings), not by the stage's own proxy metric."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from llmexp.testing import run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def llmexp(run_dir: Path, *args: str) -> dict:
    r = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    return summary(run_dir)


def task(s: dict) -> tuple:
    return s["initial"]["val/task_score"], s["final"]["val/task_score"]


# The shared runs (default_sft, short_sft, rlhf_pipeline, shipped_pipeline(name)) are
# conftest's session fixtures: each trained once per session.


def test_default_sft_learns_the_task(default_sft):
    """`python -m llmexp`: the default SFT answers the held-out questions (the task metric)."""
    s = summary(default_sft)
    before, after = task(s)
    assert before < 0.05 and after >= 0.85, (before, after)
    assert s["task"] == {"check": "arithmetic_correct", "prompts": 620, "max_new_tokens": 24}


def test_rm_from_the_default_sft_ranks_held_out_pairs(rlhf_pipeline):
    """`python -m llmexp stage=rm model.pretrained=<default sft>/model` (the rlhf pipeline's rm)."""
    run_dir = rlhf_pipeline / "2-rm"
    s = summary(run_dir)
    assert json.loads((rlhf_pipeline / "pipeline_summary.json").read_text())["stages"][1]["overrides"] == [
        "logger=csv", "stage=rm", f"model.pretrained={(rlhf_pipeline / '1-sft').resolve()}/model"]
    assert s["initial"]["val/accuracy"] < 0.75
    assert s["final"]["val/accuracy"] >= 0.9, s["final"]
    assert "task" not in s and "val/task_score" not in s["final"]  # a scorer, not a language model
    # saved with the model: the held-out mean chosen score maps to +1, the mean rejected to -1
    norm, f = s["score_normalization"], s["final"]
    saved = json.loads((run_dir / "model" / "config.json").read_text())
    assert {k: saved[k] for k in norm} == pytest.approx(norm)
    assert (f["val/score_chosen"] - norm["llmexp_score_center"]) / norm["llmexp_score_scale"] == pytest.approx(1.0)
    assert (f["val/score_rejected"] - norm["llmexp_score_center"]) / norm["llmexp_score_scale"] == pytest.approx(-1.0)
    # The export is a plain one-label sequence classifier that prefers right answers, misread
    # questions included, on fresh pairs.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmexp.data.skill import preference_pairs

    model = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "model")).eval()
    tok = AutoTokenizer.from_pretrained(str(run_dir / "model"))

    def score(prompt, response):
        ids = tok.apply_chat_template(prompt + response, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            return model(**ids).logits[0, 0].item()

    pairs = list(preference_pairs(num_samples=100, seed=99, misread_fraction=1.0))
    wins = [score(p["prompt"], p["chosen"]) > score(p["prompt"], p["rejected"]) for p in pairs]
    assert sum(wins) / len(wins) >= 0.85
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    for col in ("train/loss", "train/accuracy", "train/margin", "val/accuracy", "val/margin"):
        assert col in header


STAGE_COLUMNS = {
    "dpo": ["train/logp_chosen", "train/nll_chosen", "val/accuracy", "val/reward_margin"],
    "ppo": ["train/kl", "train/kl_coef", "train/value_loss", "train/approx_kl", "train/entropy",
            "train/response_length", "train/reward_std"],
    "grpo": ["train/entropy", "train/response_length", "train/reward_std", "train/clipfrac",
             "train/groups_without_signal"],
    "kto": ["train/kl", "train/accuracy", "train/reward_desirable", "train/reward_undesirable",
            "train/logp_chosen", "val/kl", "val/accuracy", "val/reward_desirable", "val/reward_undesirable"],
    "rloo": ["train/kl", "train/entropy", "train/response_length", "train/reward_std", "train/clipfrac",
             "train/groups_without_signal"],
    "online_dpo": ["train/kl", "train/entropy", "train/response_length", "train/reward_std", "train/accuracy",
                   "train/margin", "train/ties", "train/score_margin"],
}
# Where a rollout step's time went: metrics.csv every logging step, summary.json over the run.
TIME_SPLIT = {"ppo": ["rollout_seconds", "scoring_seconds", "reference_seconds", "optimisation_seconds",
                      "rollout_tokens_per_second"],
              "grpo": ["rollout_seconds", "scoring_seconds", "optimisation_seconds", "rollout_tokens_per_second"]}


def check_time_split(s: dict, stage: str, metrics_csv: Path) -> None:
    """Where a rollout stage's time went, in metrics.csv and summary.json."""
    header = metrics_csv.read_text().splitlines()[0]
    for col in STAGE_COLUMNS[stage] + ["val/task_score"] + [f"train/{k}" for k in TIME_SPLIT[stage]]:
        assert col in header, col
    split = s["time_split"]
    assert all(split[k] > 0 for k in TIME_SPLIT[stage]), split
    assert "old_logprobs_seconds" not in split  # the rollout's own log-probs: no extra forward pass
    parts = sum(v for k, v in split.items() if k.endswith("_seconds"))
    assert parts <= s["fit_seconds"] and split["generated_tokens"] > 0


# (ppo from the default SFT is the rlhf pipeline's third stage, against its reward model: there)
@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_post_training_keeps_a_good_sft_model_good_and_the_guard_stays_silent(tmp_path, default_sft, stage):
    s = llmexp(tmp_path / stage, f"stage={stage}", f"model.pretrained={default_sft}/model")
    before, after = task(s)
    assert before == pytest.approx(task(summary(default_sft))[1], abs=1e-6)  # the SFT model, same prompts
    # ppo from the 1.000 SFT, seeds 42 / 1 / 7, measured 0.987 / 0.987 / 0.981 with two threads and
    # 0.987 (seed 42) with one, as here; with 4 passes over each rollout batch (before 2026-12-07)
    # 0.968 / 0.974 / 0.974 and 0.948 / 0.974 / 0.929 (docs/stages.md)
    assert after >= before - (0.03 if stage == "ppo" else 0.02), (before, after)
    assert s["health"] == {"action": "warn", "warnings": []}
    assert s["wall_seconds"] < 300
    if stage == "dpo":
        assert s["initial"]["val/loss"] == pytest.approx(math.log(2) + s["initial"]["val/nll_chosen"], abs=1e-4)
        assert s["final"]["val/accuracy"] >= 0.9
        assert s["final"]["val/logp_chosen"] >= s["initial"]["val/logp_chosen"] - 1.0
    if stage in TIME_SPLIT:
        check_time_split(s, stage, tmp_path / stage / "metrics.csv")
    else:
        header = (tmp_path / stage / "metrics.csv").read_text().splitlines()[0]
        assert all(col in header for col in STAGE_COLUMNS[stage] + ["val/task_score"]), header


@pytest.mark.parametrize("name", ["dpo", "kto", "grpo", "rloo", "online_dpo"])
def test_shipped_pipelines_raise_exact_match_over_their_short_sft(shipped_pipeline, name):
    root, printed = shipped_pipeline(name)
    sft, post = json.loads((root / "pipeline_summary.json").read_text())["stages"]
    assert sft["global_step"] == 200
    start, end = post["initial"]["val/task_score"], post["final"]["val/task_score"]
    assert start == pytest.approx(sft["final"]["val/task_score"], abs=1e-6)
    assert end >= start + 0.15, (start, end)
    assert f"{name} {start:.3f} -> {end:.3f}" in printed  # the printed result shows the task metric
    assert summary(root / f"2-{name}")["health"]["warnings"] == []
    if name in ("grpo", "rloo"):  # what val/reward is, said beside the task metric it can differ from
        from llmexp.record import reward_lines

        s = summary(root / f"2-{name}")
        assert s["val_reward"] == {"reward": "arithmetic_correct", "max_new_tokens": 16, "missing_eos_penalty": -1.0}
        assert reward_lines(s) == ["  (val/reward: the reward trained on, arithmetic_correct, of greedy answers of at "
                                   "most 16 tokens, -1 for one that does not end)"]
    header = (root / f"2-{name}" / "metrics.csv").read_text().splitlines()[0]
    assert all(col in header for col in STAGE_COLUMNS.get(name, [])), header


def test_rlhf_pipeline_keeps_the_exact_match_of_its_sft(rlhf_pipeline):
    """PPO against the learned reward model, judged by the true checker, keeps the SFT's exact
    match within 0.06 (with the pipeline's kl_coef 0.5: 0.935, and 0.897 / 0.890 against reward
    models of two other seeds, which pulled it to 0.761 / 0.723 at kl_coef 0.05; before that
    0.923 -> 0.871 with the whole-solution checker; 0.910 and 0.923 on
    two seeds when the checker counted the final number alone). It fell to 0.00 before the reward
    model's scores were normalized and its pairs held the broken answers PPO drifted to, and to
    0.71 on another machine with 64 prompts per rollout, whose updates were mostly noise. The
    reward model ranks the right answer first for only ~0.8 of the questions (against near
    misses), so PPO cannot be expected to beat a 0.92 SFT by following it."""
    sft, rm, ppo = json.loads((rlhf_pipeline / "pipeline_summary.json").read_text())["stages"]
    assert rm["final"]["val/accuracy"] >= 0.9
    start, end = ppo["initial"]["val/task_score"], ppo["final"]["val/task_score"]
    assert start == pytest.approx(sft["final"]["val/task_score"], abs=1e-6)
    assert end >= start - 0.06, (start, end)
    s = summary(rlhf_pipeline / "3-ppo")
    assert s["task"]["check"] == "arithmetic_correct"  # the true checker, not the reward model's score
    assert s["health"] == {"action": "warn", "warnings": []}
    assert s["wall_seconds"] < 300
    check_time_split(s, "ppo", rlhf_pipeline / "3-ppo" / "metrics.csv")
    assert summary(rlhf_pipeline / "2-rm")["score_normalization"]["llmexp_score_scale"] > 0


@pytest.mark.parametrize("stage", ["simpo", "orpo"])
def test_reference_free_preference_stages_raise_exact_match_over_a_short_sft(tmp_path, short_sft, stage):
    """`python -m llmexp stage=simpo|orpo model.pretrained=<200-step sft>/model`, shipped defaults
    (docs/stages.md has the measured numbers: about 0.23 -> 0.6 for simpo, 0.23 -> 0.75 for orpo)."""
    s = llmexp(tmp_path / stage, f"stage={stage}", f"model.pretrained={short_sft}/model")
    start, end = task(s)
    assert start == pytest.approx(task(summary(short_sft))[1], abs=1e-6)
    assert end >= start + 0.15, (start, end)
    assert s["final"]["val/accuracy"] > s["initial"]["val/accuracy"]
    assert s["final"]["val/logp_chosen"] >= s["initial"]["val/logp_chosen"]  # the NLL term keeps them likely
    assert s["health"]["warnings"] == []
    header = (tmp_path / stage / "metrics.csv").read_text().splitlines()[0]
    for col in ("train/logp_chosen", "train/nll_chosen", "val/reward_margin", "val/reward_chosen",
                "val/reward_rejected", *(["val/log_odds_ratio"] if stage == "orpo" else [])):
        assert col in header, col


def test_ppo_from_a_short_sft_raises_exact_match(tmp_path, short_sft):
    s = llmexp(tmp_path / "ppo", "stage=ppo", f"model.pretrained={short_sft}/model")
    start, end = task(s)
    assert end >= start + 0.15, (start, end)
    assert s["health"]["warnings"] == []


def test_the_guard_stops_a_collapsing_run_with_its_exit_code(tmp_path, default_sft):
    run_dir = tmp_path / "ppo-collapse"
    # Made to collapse: a 6x lr on 64 prompts per iteration (the shipped 256 hold even at 3e-3).
    r = run_cli(["stage=ppo", f"model.pretrained={default_sft}/model", "optim.lr=3e-3", "health.action=stop",
                 "trainer.micro_batch_size=32", "trainer.grad_accum=2", "trainer.val_check_interval=50", "trainer.max_steps=100",
                 f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "health.action=stop" in r.stderr and "fix:" in r.stderr.lower() and "Traceback" not in r.stderr
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model").exists()


def test_a_guard_stop_with_keep_best_exports_the_validation_before_the_collapse(tmp_path, default_sft):
    """health.action=stop with trainer.keep_best: the run stops at the sign, as without it (exit 4),
    but first exports its best validation's model, the one before the collapse, with its metrics."""
    run_dir = tmp_path / "dpo-stop"
    # Made to collapse: 2x the shipped lr without the chosen answers' NLL term; a validation every 3 steps.
    r = run_cli(["stage=dpo", f"model.pretrained={default_sft}/model", "optim.lr=1e-3", "stage.rpo_alpha=0",
                 "health.action=stop", "trainer.monitor=val/task_score", "trainer.keep_best=true",
                 "trainer.val_check_interval=3", "trainer.max_steps=60", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    s = summary(run_dir)
    stopped, best = s["health"]["stopped"], s["best"]
    assert stopped["sign"] == "task_drop" and s["global_step"] == stopped["step"] < 60, s["health"]
    assert best["exported"] and 0 < best["step"] < stopped["step"], best
    said = " ".join(r.stderr.split())
    assert f"exported its best validation's model (step {best['step']}," in said
    assert f"train on from it in a new run with model.pretrained={run_dir / 'model'}" in said
    assert s["final"]["val/task_score"] == best["value"] >= 0.9  # the exported model's, not the collapsed one's
    kept = torch.load(best["weights"], weights_only=True)["weights"]
    exported = load_file(run_dir / "model" / "model.safetensors")
    assert set(kept) == set(exported) and all(torch.equal(exported[k], v) for k, v in kept.items())


def test_a_guard_stop_at_the_first_validation_exports_nothing_and_leaves_no_best_file(tmp_path, default_sft):
    """With keep_best, a collapse seen at the first validation has no earlier model to export: the
    run stops as without it, and the weights kept of that validation go (no checkpoint names them)."""
    run_dir = tmp_path / "dpo-stop-first"
    r = run_cli(["stage=dpo", f"model.pretrained={default_sft}/model", "optim.lr=1e-3", "stage.rpo_alpha=0",
                 "health.action=stop", "trainer.monitor=val/task_score", "trainer.keep_best=true",
                 "trainer.val_check_interval=10", "trainer.max_steps=60", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "task_drop at step 10" in r.stderr and "The run stopped without saving" in r.stderr
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model").exists()
    assert list((run_dir / "checkpoints").glob("best-*")) == []


def test_the_guard_warns_and_records_a_dpo_collapse(tmp_path, default_sft):
    s = llmexp(tmp_path / "dpo-collapse", "stage=dpo", f"model.pretrained={default_sft}/model", "optim.lr=3e-3",
               "stage.rpo_alpha=0")
    signs = {w["sign"] for w in s["health"]["warnings"]}
    assert signs & {"logp_drop", "task_drop"}, s["health"]
    last = s["health"]["warnings"][-1]  # the export, at the last validation, judged by max_final_task_drop
    assert last["sign"] == "task_drop" and last["step"] == s["global_step"], s["health"]
    assert "ends at" in last["seen"] and "health.max_final_task_drop" in last["seen"], last
    assert all(w["fix"] and w["step"] > 0 for w in s["health"]["warnings"])


def test_distill_pipeline_beats_plain_sft_of_the_same_student(distill_pipeline, half_width_sft):
    """`llmexp pipeline distill`: the default SFT teaches a student of half its width (hidden 32,
    MLP 128), which is then quantized to int8; shipped defaults. The student keeps >= 0.9 of its
    teacher's exact match and beats the same student trained by plain SFT for the same 600 steps
    (plain at 3e-3, its best lr; distill at its 2e-3): from the 1.000 teacher measured 0.961 against
    0.916 here, validation loss 0.029 against 0.045 (one thread; over 5 seeds on two threads 0.966
    against 0.912, better on each, docs/stages.md). The teacher's attention maps make the
    difference: from the earlier 0.923 teacher, without them distillation measured 0.897."""
    sft, distill, quantized = json.loads((distill_pipeline / "pipeline_summary.json").read_text())["stages"]
    teacher = sft["final"]["val/task_score"]
    s = summary(distill_pipeline / "2-distill")
    before, after = task(s)
    assert before < 0.05 and after >= 0.9 * teacher, (teacher, after)
    plain = summary(half_width_sft)
    assert plain["parameters"] == s["parameters"] and plain["global_step"] == s["global_step"]
    assert after > task(plain)[1], (after, task(plain))
    assert s["final"]["val/loss"] < 0.75 * plain["final"]["val/loss"], (s["final"], plain["final"])
    assert s["attention_transfer"]["layers"] == [[0, 0], [1, 1]]
    assert s["final"]["val/attention_divergence"] < s["initial"]["val/attention_divergence"] / 4
    assert s["final"]["val/divergence"] < s["initial"]["val/divergence"] / 10
    assert s["teacher"]["parameters"] > 2 * s["parameters"]  # the record names the teacher and its size
    config = (distill_pipeline / "2-distill" / "config.yaml").read_text()
    assert "hidden_size: 32" in config and f"teacher: {(distill_pipeline / '1-sft').resolve()}" in config
    header = (distill_pipeline / "2-distill" / "metrics.csv").read_text().splitlines()[0]
    assert "train/divergence" in header and "val/divergence" in header
    # then the student in int8: its exact match kept, its weights 3x smaller
    assert quantized["initial"]["val/task_score"] == pytest.approx(after, abs=1e-6)
    assert quantized["final"]["val/task_score"] >= after - 0.02
    assert summary(distill_pipeline / "3-quantize")["compression"]["size_ratio"] >= 3.0
    c = s["compression"]  # the student against its teacher, in the record every compression stage writes
    assert c["parameters_before"] == s["teacher"]["parameters"] and c["parameters_after"] == s["parameters"]
    assert c["size_ratio"] > 2.5 and c["model_before"] == str((distill_pipeline / "1-sft" / "model").resolve())
    # the printed summary names each model's size and what it is smaller than
    printed = (distill_pipeline / "printed.txt").read_text()
    assert (f"distill {s['parameters']:,} parameters, {c['weight_bytes_after']:,} weight bytes "
            f"({c['size_ratio']:.1f}x smaller than sft's)") in printed, printed[-1500:]
    assert "smaller than distill's)" in printed and f"sft {sft['parameters']:,} parameters;" in printed


def test_dpo_on_plain_string_pairs_from_a_chat_sft_trains_them_as_it_is_asked(tmp_path, default_sft):
    """A TRL-style file of plain strings ({"prompt": str, "chosen": str, "rejected": str}) from the
    chat SFT: each prompt is rendered as the user's message, as generate asks the model. It was
    trained raw: the record said 0.00 -> 0.92 (asked raw) while the model, asked through its template,
    fell 1.00 -> 0.40. The task metric starts where the SFT ended and `generate` still answers."""
    from llmexp.data.skill import preference_pairs

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
                                         "rejected": r["rejected"][0]["content"]}) + "\n"
                             for r in preference_pairs(400)))
    run = tmp_path / "dpo"
    s = llmexp(run, "stage=dpo", f"model.pretrained={default_sft}/model", "data=files", f"data.path={pairs}",
               "trainer.max_steps=30")  # what is asked, not what is learnt: a short run
    before, after = task(s)
    assert before >= 0.9 and after >= 0.9, (before, after)  # reference match on the file's held-out pairs
    assert any("asked as chat turns" in n for n in s["notes"]), s.get("notes")
    from llmexp.generate import generate
    from llmexp.record import load_language_model

    model, tok = load_language_model(run / "model")
    assert generate(model, tok, ["Add 3 and 9.", "Subtract 2 from 9."], 24) == ["3 + 9 = 12", "9 - 2 = 7"]
