"""Progress of a run in optimizer steps, the unit runs are limited by: one bar for the whole run on
a terminal, a plain line every tenth of the run elsewhere (a log file, a pipeline's stage, a batch
job). Lightning's bars restart at every epoch and stay on screen: a rollout stage's epoch is one
iteration, so `stage=ppo` left 150 bars, and a log file got each of them with its metrics."""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

from lightning.pytorch.callbacks import Callback

# What the bar's other columns take of a terminal line: the description (10), the bar (24), the
# elapsed and remaining times (7 each) and the spaces between the six columns (5), besides M/N.
FIXED_COLUMNS = 10 + 24 + 7 + 7 + 5


def format_metrics(metrics: Dict[str, Any]) -> str:
    """``name value`` pairs of the progress-bar metrics (``prog_bar=True``), training ones without
    their ``train/``; a health warning count only once there is one."""
    parts = []
    for name, value in metrics.items():
        value = float(value)
        if name == "health/warnings" and value == 0:
            continue
        parts.append(f"{name.removeprefix('train/')} {value:.4g}")
    return " · ".join(parts)


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters with an ellipsis (the bar keeps its room)."""
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def remaining(elapsed: float, done: int, left: int) -> Optional[float]:
    """Seconds left at the rate of the steps done in this session (None before the first)."""
    return elapsed / done * left if done > 0 else None


class StepProgress(Callback):
    """The run's progress on global rank 0; ``console`` (rich) decides bar or lines."""

    def __init__(self, console=None, lines: int = 10):
        from rich.console import Console

        self.console = console or Console()
        self.lines = lines
        self.total: Optional[int] = None  # set when training starts, on global rank 0
        self._bar = None
        self._task = None
        self.validated_at: Optional[int] = None  # the step of the last validation

    # -- the run -----------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self.total, self.first = trainer.max_steps, trainer.global_step
        self.started = time.perf_counter()
        self.every = max(1, self.total // self.lines)
        self.next_line = (self.first // self.every + 1) * self.every
        if self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(bar_width=24),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[metrics]}"), console=self.console, transient=False)
            self._task = self._bar.add_task("step", total=self.total, completed=self.first, metrics="")
            self._bar.start()
        elif self.first:
            self.console.print(f"resuming at step {self.first}/{self.total}", highlight=False)
            self.console.file.flush()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.total is None:
            return
        step = trainer.global_step
        if self._bar is not None:
            room = self.console.width - FIXED_COLUMNS - len(f"{self.total}/{self.total}") - 1
            metrics = fit(format_metrics(trainer.progress_bar_metrics), room)
            self._bar.update(self._task, completed=step, description="step", metrics=metrics)
        elif step >= self.next_line or step == self.total:
            self.next_line = (step // self.every + 1) * self.every
            shown = trainer.progress_bar_metrics
            metrics = format_metrics({k: v for k, v in shown.items() if not k.startswith("val/")})
            trainer_cfg = getattr(getattr(pl_module, "cfg", None), "trainer", None)
            logged = step - step % getattr(trainer_cfg, "log_every_n_steps", 1)
            if metrics and 0 < logged < step:  # the metrics are those of the last step logged, not this one's
                metrics += f" (at step {logged})"
            validation = format_metrics({k: v for k, v in shown.items() if k.startswith("val/")})
            if validation:  # the last validation's, which the one at this step (if any) comes after
                at = f" (at step {self.validated_at})" if self.validated_at is not None else ""
                metrics = " · ".join(m for m in (metrics, validation + at) if m)
            elapsed = time.perf_counter() - self.started
            left = remaining(elapsed, step - self.first, self.total - step)
            when = f"{elapsed:.0f} s" + (f", about {left:.0f} s left" if left is not None and step < self.total else "")
            line = f"step {step}/{self.total} ({100 * step // self.total}%) · {when}"
            self.console.print(line + (f" · {metrics}" if metrics else ""), highlight=False, soft_wrap=True)
            self.console.file.flush()  # a log file sees each line as it is written, not at the end

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._bar is not None and trainer.is_global_zero:
            self._bar.update(self._task, description="validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated_at = trainer.global_step
        if self._bar is not None and trainer.is_global_zero:
            self._bar.update(self._task, description="step")

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
