"""DPO's three references give the same training: a frozen copy, the LoRA base with the adapter
disabled (no second copy kept), and log-probs precomputed once (the reference then freed)."""

from __future__ import annotations

import json
import math

import pytest
from llmexp.testing import FAST, compose
from lightning.pytorch.callbacks import Callback

from llmexp.record import read_metrics

pytestmark = pytest.mark.slow

COMMON = [*FAST, "stage=dpo", "logger=csv", "trainer.max_steps=12", "trainer.val_check_interval=6",
          "trainer.log_every_n_steps=1", "optim.warmup_steps=2", "data.options.num_samples=300", "stage.beta=0.5",
          "stage.rpo_alpha=0", "optim.lr=3e-3"]  # a 12-step check that the references agree, not a learning test


class ReferenceSeen(Callback):
    """Records whether the stage holds a reference model while it trains."""

    def on_train_start(self, trainer, stage):
        self.reference = stage.reference
        self.rows_have_ref_logprobs = "ref_chosen_logprobs" in trainer.datamodule.train_rows[0]


def _run(tmp_path, name, extra):
    from llmexp.run import run

    seen = ReferenceSeen()
    run(compose([*COMMON, *extra]), run_dir=tmp_path / name, callbacks=[seen])
    losses = [r["train/loss"] for r in read_metrics(tmp_path / name / "metrics.csv") if "train/loss" in r]
    return losses, seen


def test_precomputed_reference_trains_like_the_copy_and_is_freed(tmp_path):
    copy_losses, copy_seen = _run(tmp_path, "copy", ["stage.reference=copy"])
    pre_losses, pre_seen = _run(tmp_path, "pre", ["stage.reference=precomputed"])
    assert copy_seen.reference is not None and not copy_seen.rows_have_ref_logprobs
    assert pre_seen.reference is None and pre_seen.rows_have_ref_logprobs
    assert len(copy_losses) == 12
    assert copy_losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert pre_losses == pytest.approx(copy_losses, rel=1e-5)


def test_lora_reference_is_the_adapter_disabled_base(tmp_path):
    lora = ["peft=lora", "optim.lr=1e-2"]
    copy_losses, copy_seen = _run(tmp_path, "copy", [*lora, "stage.reference=copy"])
    base_losses, base_seen = _run(tmp_path, "base", [*lora, "stage.reference=adapter_disabled"])
    pre_losses, pre_seen = _run(tmp_path, "pre", [*lora, "stage.reference=precomputed"])
    assert copy_seen.reference is not None
    assert base_seen.reference is None and pre_seen.reference is None  # no second copy in memory
    assert base_losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert base_losses == pytest.approx(copy_losses, rel=1e-5)
    assert pre_losses == pytest.approx(copy_losses, rel=1e-5)
    # it learns: the held-out loss falls (a per-step train loss is too noisy over 12 steps)
    summary = json.loads((tmp_path / "base" / "summary.json").read_text())
    assert summary["final"]["val/loss"] < summary["initial"]["val/loss"]
    assert summary["final"]["val/reward_margin"] > 0
