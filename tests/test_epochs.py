"""trainer.epochs: a run's length in passes over its training rows, turned into trainer.max_steps
once the rows are counted."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from llmexp.testing import FAST, check_config, run_cli, train, typed

from llmexp.data.sampler import WindowSampler, steps_for_epochs
from llmexp.errors import ConfigError
from llmexp.strategies import data_parallel_size


def test_steps_for_epochs_are_the_samplers_windows_per_pass():
    assert steps_for_epochs(2, 587, 16, 1) == (72, 36)
    assert steps_for_epochs(1, 587, 16, 2) == (18, 18)
    assert steps_for_epochs(0.5, 587, 16, 2) == (9, 18)
    assert steps_for_epochs(0.001, 587, 16, 1) == (1, 36)  # at least one step
    assert len(WindowSampler(587, 16, seed=1, world_size=2)) == 18  # the same count the sampler makes


def test_data_parallel_ranks_as_lightning_counts_them():
    assert data_parallel_size(typed([])) == 1
    assert data_parallel_size(typed(["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"])) == 2
    assert data_parallel_size(typed(["strategy=ddp", "trainer.devices=[0,1,2]", "trainer.accelerator=cpu"])) == 3
    assert data_parallel_size(typed(["strategy=ddp", "trainer.devices=2", "trainer.num_nodes=2",
                                     "trainer.accelerator=cpu"])) == 4
    assert data_parallel_size(typed(["strategy=tp", "trainer.devices=2", "trainer.accelerator=cpu"])) == 1
    assert data_parallel_size(typed(["strategy=fsdp", "trainer.devices=4", "strategy.tensor_parallel_size=2",
                                     "trainer.accelerator=cpu"])) == 2


def test_one_epoch_trains_one_pass_with_the_schedule_over_it(tmp_path):
    run = train(tmp_path, ["trainer.epochs=1", "trainer.val_check_interval=null", "trainer.log_every_n_steps=1",
                           "data.options.num_samples=300"])
    summary = json.loads((run / "summary.json").read_text())
    ep = summary["epochs"]
    assert ep["data_parallel_ranks"] == 1 and ep["steps_per_epoch"] == ep["rows"] // 8  # FAST: 8 rows a step
    assert summary["global_step"] == ep["max_steps"] == ep["steps_per_epoch"] != 40  # not FAST's max_steps
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == ep["max_steps"] and config["trainer"]["epochs"] == 1.0
    with open(run / "metrics.csv", newline="") as fh:
        lrs = [float(r["train/lr"]) for r in csv.DictReader(fh) if r.get("train/lr")]
    # the cosine schedule ran over these steps: its last step is at the floor, min_lr_ratio x lr
    lr, floor = config["optim"]["lr"], config["optim"]["min_lr_ratio"] * config["optim"]["lr"]
    assert lrs[-1] == pytest.approx(floor, rel=0.05) and max(lrs) == pytest.approx(lr, rel=0.05)


@pytest.mark.slow
def test_epochs_under_ddp_count_the_rows_both_ranks_share(tmp_path):
    run = tmp_path / "ddp"
    fast = [o for o in FAST if not o.startswith("trainer.max_steps=")]  # trainer.epochs sets them
    r = run_cli([*fast, "trainer.epochs=1", "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                 "data.options.num_samples=300", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    ep = summary["epochs"]
    assert ep["data_parallel_ranks"] == 2 and summary["global_step"] == ep["rows"] // (8 * 2)
    assert "trainer.epochs=1: " in r.stderr


def test_epochs_of_a_stream_are_refused():
    # with max_steps given as well: it was ignored (a 5-step command ran 13 steps)
    with pytest.raises(ConfigError) as e:
        check_config(["trainer.epochs=0.5", "trainer.max_steps=5"])
    assert [p.key for p in e.value.problems] == ["trainer.max_steps"]
    with pytest.raises(ConfigError) as e:
        check_config(["stage=pretrain", "data=files", "data.path=x.jsonl", "data.streaming=true", "trainer.epochs=1"])
    assert "trainer.epochs" in [p.key for p in e.value.problems]
