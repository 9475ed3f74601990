"""RunDir owns the layout of a run directory; everything that reads a run goes through it."""

from __future__ import annotations

import json

import pytest

from llmexp.errors import UserError
from llmexp.record import RunDir, model_dir_of, write_summary


def test_paths_held_files_and_summary(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.summary_file == tmp_path / "run" / "summary.json"
    assert run.last_checkpoint == tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert run.model == tmp_path / "run" / "model" and run.metrics.name == "metrics.csv"
    run.path.mkdir()
    assert run.held() == [] and not run.finished() and run.summary() is None
    write_summary(run.path, {"stage": "sft", "final": {"val/loss": float("nan")}})
    assert run.finished() and run.summary() == {"stage": "sft", "final": {"val/loss": None}}
    run.checkpoints.mkdir()
    assert run.held() == ["summary.json", "checkpoints"]


def test_the_checkpoint_to_resume_is_last_else_the_highest_step(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoint_to_resume() is None
    run.checkpoints.mkdir()
    for step in (9, 10, 2):
        (run.checkpoints / f"step-{step}.ckpt").write_text("x")
    assert run.checkpoint_to_resume().name == "step-10.ckpt"  # by number, not by name
    run.last_checkpoint.mkdir()  # a sharded checkpoint is a directory
    assert run.checkpoint_to_resume() == run.last_checkpoint


def test_model_dir_of_a_run_a_model_or_neither(tmp_path):
    run = RunDir(tmp_path / "run")
    run.model.mkdir(parents=True)
    (run.model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert model_dir_of(str(run.path)) == run.model
    assert model_dir_of(f"run={run.path}") == run.model
    assert model_dir_of(str(run.model)) == run.model
    with pytest.raises(UserError, match="nothing' does not exist; give a finished run's directory"):
        model_dir_of(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run directory"):
        model_dir_of(str(tmp_path / "empty"))
    killed = RunDir(tmp_path / "killed")
    (killed.checkpoints).mkdir(parents=True)
    killed.config.write_text("stage: {name: sft}\n")
    with pytest.raises(UserError, match="is a run that did not finish, so it has no model/ yet; it wrote no checkpoint"):
        model_dir_of(str(killed.path))
    (run.model / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(UserError, match="reward model"):
        model_dir_of(str(run.path))
