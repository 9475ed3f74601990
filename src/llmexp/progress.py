"""A rich progress bar that speaks in optimizer steps (runs are step-limited, not epoch-limited)."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        return f"Epoch {current_epoch} · from step {trainer.global_step} of {trainer.max_steps}"
