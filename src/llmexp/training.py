"""The Lightning Trainer of a run: strategy, precision, callbacks, loggers from config."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from llmexp.checkpointing import AtomicCheckpointIO, RunCheckpoint
from llmexp.config.schema import RunConfig
from llmexp.loggers import count_steps_of
from llmexp.record import RunDir
from llmexp.strategies import build_strategy


def build_trainer(cfg: RunConfig, run_dir: Path, loggers: List[Any], extra_callbacks: List[Any] = ()):
    import lightning as L

    from llmexp.progress import StepProgress

    t = cfg.trainer
    every = t.checkpoint_every_n_steps or t.val_check_interval or t.max_steps
    # RunCheckpoint: no step-N-v1.ckpt / last-v1.ckpt after a kill, right paths in a moved run dir
    callbacks = [RunCheckpoint(dirpath=str(RunDir(run_dir).checkpoints), filename="step-{step}",
                               every_n_train_steps=every, keep=t.keep_checkpoints, save_last=True,
                               auto_insert_metric_name=False), *extra_callbacks]
    if t.progress_bar:
        callbacks.append(StepProgress())
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        val_check_interval=t.val_check_interval or t.max_steps + 1,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=False,  # llmexp.progress draws it, in steps
        enable_model_summary=False,
        use_distributed_sampler=False,  # llmexp's WindowSampler shards by rank itself
        plugins=[] if cfg.strategy.name in ("fsdp", "tp") or cfg.strategy.name.startswith("deepspeed")
        else [AtomicCheckpointIO()],  # sharded strategies write their own checkpoint directories
    )
    count_steps_of(trainer)
    return trainer


def save_last_checkpoint(trainer, run_dir: Path) -> Path:
    """``checkpoints/last.ckpt`` at the final step."""
    path = RunDir(run_dir).last_checkpoint
    trainer.save_checkpoint(str(path), weights_only=False)  # atomic through AtomicCheckpointIO
    return path


def fit(trainer, stage, data, resume_from: Optional[Path]) -> Tuple[Dict[str, float], float]:
    """Validate before training (not when resuming: the checkpoint holds the initial metrics),
    train, validate after (unless a validation ran at the last step: same weights, same
    metrics); returns (final validation metrics, seconds in fit). Known faults
    (out of memory, a diverged loss) get one clear message."""
    from llmexp.faults import explain_faults

    with explain_faults():
        if resume_from is None:
            trainer.validate(stage, datamodule=data, verbose=False)
            stage.initial_metrics = dict(stage.last_val_metrics)
        started = time.time()
        trainer.fit(stage, datamodule=data, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
        fit_seconds = time.time() - started
        if stage.last_val_at != ("fit", trainer.global_step):  # else the last step's validation says it all
            trainer.validate(stage, datamodule=data, verbose=False)
    return dict(stage.last_val_metrics), fit_seconds
