"""torch.compile (model.compile=true) trains the same steps as eager execution, compiling one graph."""

from __future__ import annotations

import pytest
from llmexp.testing import train
from torch._dynamo.utils import counters

from llmexp.record import read_metrics

pytestmark = pytest.mark.slow


def test_compiled_model_matches_eager(tmp_path):
    common = ["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1",
              "optim.warmup_steps=1", "data.max_length=64", "data.packing=true", "trainer.micro_batch_size=4"]
    losses = {}
    counters.clear()
    for mode in ("eager", "compiled"):
        run_dir = train(tmp_path, [*common, f"model.compile={'true' if mode == 'compiled' else 'false'}"], name=mode)
        losses[mode] = [r["train/loss"] for r in read_metrics(run_dir / "metrics.csv") if "train/loss" in r]
    assert len(losses["eager"]) == 4
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    # One graph: the training forward on packed rows of one shape. Validation, the task probe and
    # generation ran eager (before, each new shape compiled again, up to dynamo's recompile limit).
    assert counters["stats"]["unique_graphs"] == 1
