"""trainer.monitor: the best validation of a run, its model exported with trainer.keep_best, and
early stopping on the same metric."""

from __future__ import annotations

import csv
import json
import math
import signal

import pytest
import torch
from llmexp.best_model import improves
from llmexp.config.schema import monitor_direction
from llmexp.errors import ConfigError, UserError
from llmexp.testing import FAST, check_config, run_cli, run_module, train, train_in_subprocess
from safetensors.torch import load_file

# The validation loss falls as a run trains, so with "higher is better" the first validation after
# the first step is the best one: a best that is not the last step, on any seed.
FIRST_IS_BEST = ["trainer.monitor=val/loss", "trainer.monitor_mode=max"]


def _val_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = [{k: v for k, v in r.items() if v} for r in csv.DictReader(fh)]
    return {int(float(r["step"])): {k: float(v) for k, v in r.items() if k.startswith("val/")}
            for r in rows if "val/loss" in r}


def summary_final_equals_row(run, step) -> bool:
    """The final metrics of summary.json are those metrics.csv logged at the validation of ``step``."""
    return json.loads((run / "summary.json").read_text())["final"] == pytest.approx(_val_rows(run)[step])


def test_the_direction_of_a_metric_and_what_improves_on_a_best():
    assert monitor_direction("val/loss", "auto") == "min"
    assert monitor_direction("val/perplexity", "auto") == "min"
    assert [monitor_direction(m, "auto") for m in ("val/task_score", "val/reward", "val/accuracy")] == ["max"] * 3
    assert monitor_direction("val/response_length", "auto") is None
    assert monitor_direction("val/response_length", "min") == "min"
    assert monitor_direction("val/loss", "max") == "max"
    assert improves(0.5, None, "min") and improves(0.4, 0.5, "min") and not improves(0.5, 0.5, "min")
    assert improves(0.6, 0.5, "max") and not improves(0.4, 0.5, "max")
    assert not improves(math.nan, None, "max") and not improves(math.nan, 0.5, "min")
    # lm-eval's metric names
    assert [monitor_direction(f"eval/t/{m}", "auto") for m in ("acc", "acc_norm", "exact_match", "f1")] == ["max"] * 4
    assert [monitor_direction(f"eval/t/{m}", "auto") for m in ("word_perplexity", "bits_per_byte")] == ["min"] * 2


def test_keep_best_exports_the_best_validation_and_its_eval_and_last_ckpt_resumes_the_last_step(tmp_path):
    run = train(tmp_path, [*FIRST_IS_BEST, "trainer.keep_best=true", "eval=lm_eval", "eval.tasks=[arithmetic_ppl]",
                           "eval.limit=20", "eval.before_training=false"])
    summary = json.loads((run / "summary.json").read_text())
    ckpts = run / "checkpoints"
    best = summary["best"]
    assert {k: best[k] for k in ("monitor", "mode", "step", "exported")} == {
        "monitor": "val/loss", "mode": "max", "step": 20, "exported": True}
    assert best["weights"] == str(ckpts / "best-step-20.ckpt")
    assert sorted(p.name for p in ckpts.glob("best-*")) == ["best-step-20.ckpt"]  # the superseded ones go

    rows = _val_rows(run)
    assert sorted(rows) == [0, 20, 40]
    assert summary["final"] == pytest.approx(rows[20]) and best["value"] == pytest.approx(rows[20]["val/loss"])
    assert rows[40]["val/loss"] < rows[20]["val/loss"]  # the last step's model was a different one

    exported = load_file(run / "model" / "model.safetensors")
    kept = torch.load(ckpts / "best-step-20.ckpt", weights_only=True)["weights"]
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["global_step"] == 40
    assert kept.keys() <= exported.keys() | {k for k in kept if k.endswith("lm_head.weight")}
    for name, tensor in kept.items():
        if name in exported:
            assert torch.equal(exported[name], tensor), name
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(last["state_dict"][f"model.{name}"], exported[name])  # last.ckpt: step 40's

    # The eval after training scored the exported model: the same as evaluating it again.
    again = run_module("llmexp.eval", [str(run), "--tasks", "arithmetic_ppl", "--limit", "20"])
    assert again.returncode == 0, again.stderr[-2000:]
    after = json.loads((run / "eval" / "results.json").read_text())["arithmetic_ppl"]
    redone = json.loads(sorted((run / "eval").glob("results-*.json"))[-1].read_text())["arithmetic_ppl"]
    assert after["word_perplexity"] == pytest.approx(redone["word_perplexity"], rel=1e-6)


def test_keep_best_with_lora_keeps_the_adapters_and_exports_them_merged(tmp_path):
    run = train(tmp_path, [*FIRST_IS_BEST, "trainer.keep_best=true", "peft=lora", "optim.lr=1e-2"])
    kept = torch.load(run / "checkpoints" / "best-step-20.ckpt", weights_only=True)["weights"]
    assert kept and all("lora_" in name for name in kept)  # the trained parameters only
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    exported = load_file(run / "model" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    layer = "base_model.model.model.layers.0.self_attn.q_proj."
    base = last[f"model.{layer}base_layer.weight"]  # frozen: step 20's as well
    scale = 16 / 8  # the shipped peft=lora alpha / r
    for adapters, expected in ((kept, True), ({k[len("model."):]: v for k, v in last.items()}, False)):
        merged = base + adapters[f"{layer}lora_B.default.weight"] @ adapters[f"{layer}lora_A.default.weight"] * scale
        assert torch.allclose(merged, exported, atol=1e-6) is expected
    # `llmexp export --checkpoint best` is that model too: the best adapters on the checkpoint's base, merged
    from llmexp.export_command import main

    assert main([str(run), "--checkpoint", "best", "--format", "hf", "--out", str(tmp_path / "best")]) == 0
    a, b = load_file(tmp_path / "best" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_ends_the_run_when_the_monitor_stops_improving(tmp_path, capsys):
    run = train(tmp_path, [*FIRST_IS_BEST, "trainer.early_stopping_patience=1", "trainer.max_steps=100"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 40  # validations at 20 (best) and 40 (no better): stop
    assert summary["stopped_early"]["step"] == 40
    assert "did not improve on step 20's" in summary["stopped_early"]["reason"]
    assert summary["best"]["step"] == 20 and summary["best"]["exported"] is False
    assert summary_final_equals_row(run, 40)  # without keep_best: the last step's model
    assert not list((run / "checkpoints").glob("best-*"))
    err = capsys.readouterr().err
    assert "stopped early at step 40" in err and "best validation: step 20 of 40" in err


@pytest.mark.slow
@pytest.mark.parametrize("checkpoints, kill_at", [("5", 17), ("null", 12)], ids=["every-5", "at-validations"])
def test_a_killed_keep_best_run_resumes_to_the_same_best_model(tmp_path, checkpoints, kill_at):
    """Killed after step 17 (step 15's checkpoint names step 10's best, whose weights wait beside it),
    or after step 12: step 10's checkpoint, written at a validation, is saved after it, so that it
    holds the best that validation found (saved before it, the resumed run never knew of it)."""
    overrides = [*FAST, "trainer.max_steps=30", f"trainer.checkpoint_every_n_steps={checkpoints}",
                 "trainer.val_check_interval=10", *FIRST_IS_BEST, "trainer.keep_best=true",
                 "trainer.early_stopping_patience=5"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train_in_subprocess(overrides, straight).returncode == 0
    assert train_in_subprocess(overrides, killed, kill_at=kill_at).returncode == -signal.SIGKILL
    assert (killed / "checkpoints" / "best-step-10.ckpt").is_file()
    saved = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["callbacks"]["BestValidation"]["step"] == 10
    assert saved["callbacks"]["BestValidation"]["early_stopping"]["best_score"] == pytest.approx(
        saved["callbacks"]["BestValidation"]["value"])
    # the best so far of the killed run (no model/ yet) is the model the uninterrupted run exports
    r = run_cli(["export", str(killed), "--checkpoint", "best", "--format", "hf"], cwd=tmp_path)
    assert r.returncode == 0 and "(the best validation by val/loss, step 10 of" in r.stdout, r.stderr[-3000:]
    a = load_file(killed / "exports" / "step-10" / "model.safetensors")
    b = load_file(straight / "model" / "model.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    r = train_in_subprocess([*overrides, f"resume={killed}"], killed)
    assert r.returncode == 0, r.stderr[-3000:]
    for run in (straight, killed):
        assert json.loads((run / "summary.json").read_text())["best"]["step"] == 10
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.slow
def test_keep_best_under_fsdp_puts_the_best_weights_back_into_the_shards(tmp_path):
    run = tmp_path / "fsdp"
    r = run_cli([*FAST, "strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu", *FIRST_IS_BEST,
                 "trainer.keep_best=true", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["best"]["step"] == 20
    kept = torch.load(run / "checkpoints" / "best-step-20.ckpt", weights_only=True)["weights"]
    exported = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(exported[name], tensor) for name, tensor in kept.items() if name in exported)
    assert summary_final_equals_row(run, 20)


EVAL_PPL = ["eval=lm_eval", "eval.tasks=[arithmetic_ppl]", "eval.limit=20"]


def test_an_eval_metric_as_monitor_exports_its_best_eval_and_stops_early_on_it(tmp_path):
    """trainer.monitor=eval/<task>/<metric>: the eval runs at each validation in training; the best
    one's model is exported, its eval is the run's eval (not run again), and early stopping reads it.
    bits per byte falls as the run trains, so "higher is better" makes the first one the best."""
    run = train(tmp_path, [*EVAL_PPL, "eval.before_training=false", "trainer.monitor=eval/arithmetic_ppl/bits_per_byte",
                           "trainer.monitor_mode=max", "trainer.keep_best=true", "trainer.early_stopping_patience=1",
                           "trainer.max_steps=100"])
    summary = json.loads((run / "summary.json").read_text())
    with open(run / "metrics.csv", newline="") as fh:
        evals = [(int(float(r["step"])), float(r["eval/arithmetic_ppl/bits_per_byte"])) for r in csv.DictReader(fh)
                 if r.get("eval/arithmetic_ppl/bits_per_byte")]
    assert [step for step, _ in evals] == [20, 40], evals  # once per validation; the eval after training reused
    assert evals[1][1] < evals[0][1]
    best = summary["best"]
    assert (best["step"], best["exported"]) == (20, True) and best["value"] == pytest.approx(evals[0][1])
    assert summary["global_step"] == 40 and summary["stopped_early"]["step"] == 40
    assert summary["eval"]["arithmetic_ppl"]["bits_per_byte"] == pytest.approx(evals[0][1])
    assert json.loads((run / "eval" / "results.json").read_text()) == summary["eval"]
    assert summary_final_equals_row(run, 20)
    kept = torch.load(run / "checkpoints" / "best-step-20.ckpt", weights_only=True)["weights"]
    exported = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(exported[name], tensor) for name, tensor in kept.items() if name in exported)


def test_a_misspelt_eval_monitor_is_named_by_the_eval_before_training(tmp_path):
    with pytest.raises(UserError) as e:
        train(tmp_path, [*EVAL_PPL, "trainer.monitor=eval/arithmetic_ppl/perplexity"])
    assert "eval=lm_eval reports eval/arithmetic_ppl/bits_per_byte, eval/arithmetic_ppl/byte_perplexity" in str(e.value)
    with open(tmp_path / "run" / "metrics.csv", newline="") as fh:
        assert not [r for r in csv.DictReader(fh) if r.get("train/loss")]  # said before the first step


def test_monitor_problems_are_named_before_the_run():
    with pytest.raises(ConfigError) as e:
        check_config(["trainer.keep_best=true", "trainer.early_stopping_patience=2"])
    assert sorted(p.key for p in e.value.problems) == ["trainer.early_stopping_patience", "trainer.keep_best"]
    with pytest.raises(ConfigError) as e:
        check_config(["trainer.monitor=loss"])
    assert [p.key for p in e.value.problems] == ["trainer.monitor"]
    for monitor, eval_name in (("eval/arithmetic_gen/exact_match", "none"), ("eval/exact_match", "lm_eval")):
        with pytest.raises(ConfigError) as e:
            check_config([f"trainer.monitor={monitor}", f"eval={eval_name}"])
        assert [p.key for p in e.value.problems] == ["trainer.monitor"], monitor
    check_config(["trainer.monitor=eval/arithmetic_gen/exact_match", "eval=lm_eval"])
    with pytest.raises(ConfigError) as e:
        check_config(["trainer.monitor=val/response_length", "trainer.val_check_interval=null"])
    assert sorted(p.key for p in e.value.problems) == ["trainer.monitor_mode", "trainer.val_check_interval"]


def test_a_monitor_the_stage_does_not_validate_exits_2_naming_the_ones_it_does(tmp_path):
    r = run_cli(["logger=none", "trainer.progress_bar=false", "trainer.monitor=val/reward"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "trainer.monitor=val/reward: stage=sft validates val/loss, val/perplexity" in r.stderr
    assert "Traceback" not in r.stderr
