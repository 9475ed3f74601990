"""The best validation of a run by ``trainer.monitor``: which step it was (summary.json ``best``),
its model kept for export (``trainer.keep_best``), and early stopping on the same metric
(``trainer.early_stopping_patience``, Lightning's EarlyStopping).

A stage can make a model worse while training (a post-training stage from a model that already
answers everything); with keep_best the run exports the validation that was best instead of the
last step. Every validation after the first optimizer step is a candidate, the one after the last
step included; the starting model (step 0) is not: the user has it already.

The best weights (the trained parameters only: a LoRA run keeps its adapters) are written to
``checkpoints/best-step-N.ckpt`` when a validation improves on the best. A best file stays while a
checkpoint on disk names it, so a run killed and resumed from any checkpoint still finds the best
it had; the others are removed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch

from llmexp.config.schema import monitor_direction
from llmexp.errors import UserError

BEST_FILE = re.compile(r"best-step-(\d+)\.ckpt")


def improves(value: float, best: Optional[float], mode: str) -> bool:
    """Whether ``value`` is strictly better than ``best`` (None: nothing yet); NaN never is."""
    if math.isnan(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def best_file(checkpoints: Path, step: int) -> Path:
    return Path(checkpoints) / f"best-step-{step}.ckpt"


def trained_weights(stage) -> Dict[str, Any]:
    """The parameters the run trains, whole and on CPU (on rank 0 under fsdp/tp: a collective)."""
    names = {n for n, p in stage.model.named_parameters() if p.requires_grad}
    state = stage.full_state_dict() if stage.is_model_parallel else stage.model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items() if k in names}


def load_trained_weights(stage, weights: Dict[str, Any]) -> None:
    """Put ``weights`` (from trained_weights; under fsdp/tp only rank 0's are read) into the model."""
    if stage.is_model_parallel:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(stage.model, weights if stage.trainer.is_global_zero else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
        return
    unexpected = stage.model.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"the best validation's weights hold parameters this model lacks: {unexpected[:3]}")


class BestValidation(L.Callback):
    """Tracks the best validation by ``monitor``; with ``keep`` writes its weights and, through
    ``restore``, puts them back into the model once training is over."""

    def __init__(self, monitor: str, mode: str, keep: bool, checkpoints: Path, early: Optional[Any] = None,
                 evaluation: Optional[Any] = None):
        self.monitor, self.mode, self.keep, self.checkpoints = monitor, mode, keep, Path(checkpoints)
        self.early = early  # Lightning's EarlyStopping on the same metric; its hooks are called from here
        self.evaluation = evaluation  # the run's eval, when the monitor is one of its metrics (eval/...)
        self.step: Optional[int] = None
        self.value: Optional[float] = None
        self.metrics: Dict[str, float] = {}
        self.named_by_checkpoint: Optional[int] = None  # the best step the last checkpoint written names
        self.notes: List[str] = []
        self.stopped_at: Optional[int] = None

    # -- tracking --------------------------------------------------------------------------------
    def on_validation_end(self, trainer, pl_module) -> None:
        trained = trainer.global_step > 0 and not trainer.sanity_checking  # the starting model is no candidate
        value = self._observed(trainer, pl_module, trained)
        if not trained:
            return
        if improves(value, self.value, self.mode):
            if self.keep:
                self._write(trainer, pl_module)
            self.step, self.value, self.metrics = trainer.global_step, value, dict(pl_module.last_val_metrics)
            self._remove_unnamed(trainer)
        if self.early is not None:  # counts the validations in training only
            self.early.on_validation_end(trainer, pl_module)

    def _observed(self, trainer, pl_module, trained: bool) -> Optional[float]:
        """The monitor at this validation: the stage's val/ metric (a name it lacks is said at the
        validation before training), or the eval's result, which it runs after the first step."""
        if self.evaluation is not None:
            if not trained:
                return None
            value = float(self.evaluation.metrics_at(trainer.global_step)[self.monitor])
            trainer.callback_metrics[self.monitor] = torch.tensor(value)  # where EarlyStopping reads it
            return value
        metrics = pl_module.last_val_metrics
        if self.monitor not in metrics:
            raise UserError(f"trainer.monitor={self.monitor}: stage={pl_module.cfg.stage.name} validates "
                            f"{', '.join(sorted(metrics)) or 'nothing'}; set trainer.monitor to one of them")
        return float(metrics[self.monitor])

    def _write(self, trainer, stage) -> None:
        from llmexp.checkpointing import AtomicCheckpointIO

        weights = trained_weights(stage)
        if trainer.is_global_zero:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            AtomicCheckpointIO().save_checkpoint({"step": trainer.global_step, "monitor": self.monitor,
                                                  "weights": weights}, best_file(self.checkpoints, trainer.global_step))
        trainer.strategy.barrier("llmexp-best-weights")

    def _remove_unnamed(self, trainer) -> None:
        """Remove the best files neither the best nor the newest checkpoint on disk names."""
        if not trainer.is_global_zero or not self.checkpoints.is_dir():
            return
        keep = {self.step, self.named_by_checkpoint}
        for path in self.checkpoints.glob("best-step-*.ckpt"):
            found = BEST_FILE.fullmatch(path.name)
            if found and int(found.group(1)) not in keep:
                path.unlink(missing_ok=True)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A run that failed (a health stop, a fault) resumes, if at all, from its newest checkpoint:
        the best files that checkpoint does not name are of no further use."""
        self.step = None
        self._remove_unnamed(trainer)

    # -- resume ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.named_by_checkpoint = self.step

    def state_dict(self) -> Dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "step": self.step, "value": self.value,
                "metrics": self.metrics, "early_stopping": self.early.state_dict() if self.early is not None else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.early is not None and state.get("early_stopping") and state.get("monitor") == self.monitor:
            self.early.load_state_dict(state["early_stopping"])
        if (state.get("monitor"), state.get("mode")) != (self.monitor, self.mode) or state.get("step") is None:
            return  # the checkpoint tracked another metric (or none yet): start afresh
        self.step, self.value, self.metrics = state["step"], state["value"], dict(state["metrics"])
        self.named_by_checkpoint = self.step
        if self.keep and not best_file(self.checkpoints, self.step).is_file():
            self.notes.append(f"the best validation's weights ({best_file(self.checkpoints, self.step)}) are gone; "
                              f"the best is chosen among the validations after the resume")
            self.step = self.value = None
            self.metrics = {}

    # -- the end ---------------------------------------------------------------------------------
    def restore(self, trainer, stage) -> int:
        """Once the last step is checkpointed: the best validation's weights and metrics into the
        stage (nothing to do when the last validation was the best); returns the step whose weights
        the model then holds."""
        self.stopped_at = trainer.global_step
        if self.keep and self.step is not None and self.step != trainer.global_step:
            path = best_file(self.checkpoints, self.step)
            weights = torch.load(path, map_location="cpu", weights_only=True)["weights"] \
                if trainer.is_global_zero or not stage.is_model_parallel else {}
            load_trained_weights(stage, weights)
            stage.last_val_metrics = dict(self.metrics)
        self._remove_unnamed(trainer)
        return self.step if self.keep and self.step is not None else trainer.global_step

    def summary(self) -> Dict[str, Any]:
        """summary.json's ``best`` (and ``stopped_early`` when the early stopping ended the run)."""
        best: Dict[str, Any] = {"monitor": self.monitor, "mode": self.mode, "step": self.step, "value": self.value,
                                "exported": self.keep and self.step is not None}
        if best["exported"]:
            best["weights"] = str(best_file(self.checkpoints, self.step))
        out: Dict[str, Any] = {"best": best}
        if self.early is not None and self.early.stopping_reason_message:
            out["stopped_early"] = {"step": self.stopped_at, "reason": self._stop_reason()}
        if self.notes:
            out["best"]["notes"] = list(self.notes)
        return out

    def _stop_reason(self) -> str:
        from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

        if self.early.stopping_reason != EarlyStoppingReason.PATIENCE_EXHAUSTED or self.step is None:
            return self.early.stopping_reason_message
        n = self.early.patience
        return (f"{self.monitor} did not improve on step {self.step}'s {self.value:.4f} in {n} validation"
                f"{'s' if n > 1 else ''} (trainer.early_stopping_patience={n})")


def best_validation(cfg, checkpoints: Path, evaluation: Optional[Any] = None) -> Optional[BestValidation]:
    """The BestValidation of ``cfg.trainer``'s monitor, with its early stopping (None without a
    monitor); ``evaluation`` is the run's eval callback, which an eval/... monitor reads."""
    t = cfg.trainer
    if not t.monitor:
        return None
    mode = monitor_direction(t.monitor, t.monitor_mode)
    early = None
    if t.early_stopping_patience:
        from lightning.pytorch.callbacks import EarlyStopping

        early = EarlyStopping(monitor=t.monitor, mode=mode, patience=t.early_stopping_patience,
                              check_on_train_epoch_end=False, verbose=False)
    return BestValidation(t.monitor, mode, t.keep_best, checkpoints, early,
                          evaluation if t.monitor.startswith("eval/") else None)
