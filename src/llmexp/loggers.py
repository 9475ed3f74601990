"""Lightning loggers from config: always a CSV of metrics in the run directory, plus W&B."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from llmexp.config.schema import LoggerConfig
from llmexp.record import RunDir


def build_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str, config: Dict[str, Any],
                  log_every_n_steps: int = 10, resume_step: Optional[int] = None) -> List[Any]:
    """A CSV logger (flushed at every logging step, so a killed run keeps its metrics; a resumed
    run keeps the rows before its checkpoint) and, unless disabled, W&B."""
    from lightning.pytorch.loggers import CSVLogger

    kept = rows_before(RunDir(run_dir).metrics, resume_step) if resume_step is not None else []
    csv_logger = at_steps_done(CSVLogger)(save_dir=str(run_dir), name="", version="",
                                          flush_logs_every_n_steps=log_every_n_steps)
    if kept:
        csv_logger.experiment.metrics = kept + csv_logger.experiment.metrics
    loggers: List[Any] = [csv_logger]
    if cfg.name == "wandb" and cfg.mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        wandb = at_steps_done(WandbLogger)(project=cfg.project, entity=cfg.entity, name=run_name,
                                           save_dir=str(run_dir), offline=cfg.mode == "offline",
                                           tags=list(cfg.tags), config=config, settings=_wandb_settings(),
                                           id=wandb_run_id(run_dir), resume="allow")
        init = getattr(wandb, "_wandb_init", None)
        if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
            # Lightning passes anonymous=None, which wandb >= 0.22 answers with a deprecation warning on
            # every run ("The anonymous setting has no effect"); unset is what it means.
            del init["anonymous"]
        loggers.append(wandb)
    return loggers


WANDB_ID = "wandb/llmexp-run-id"  # in the run directory


def wandb_run_id(run_dir: Path) -> str:
    """The run's W&B id: made at its first session and kept in the run directory, so that a resumed
    run logs on as the same W&B run (each session was a run of its own: wandb sync uploaded an
    interrupted fragment and a continuation)."""
    path = Path(run_dir) / WANDB_ID
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    import secrets

    run_id = secrets.token_hex(4)  # W&B's own ids: 8 lowercase letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def at_steps_done(logger_cls):
    """``logger_cls`` writing each row at the number of optimizer steps done. Lightning logs a
    training step's metrics at its 0-based index, so the validation after step 200 was row 199
    while the evals after it were row 200 and summary.json said 200 steps."""

    class AtStepsDone(logger_cls):
        steps_done: Optional[Callable[[], int]] = None

        def log_metrics(self, metrics, step=None):
            return super().log_metrics(metrics, self.steps_done() if self.steps_done else step)

    AtStepsDone.__name__ = AtStepsDone.__qualname__ = logger_cls.__name__
    return AtStepsDone


def count_steps_of(trainer) -> None:
    """Each of ``trainer``'s llmexp loggers writes its rows at ``trainer.global_step``."""
    for logger in trainer.loggers:
        if hasattr(logger, "steps_done"):
            logger.steps_done = lambda: trainer.global_step


def rows_before(metrics_csv: Path, step: int) -> List[Dict[str, str]]:
    """The rows of ``metrics_csv`` logged up to ``step`` (those a checkpoint at ``step`` has seen),
    each cell as it was written (a row kept on resume is written again; parsed, its step 8 came back
    as 8.0), empty cells left out."""
    import csv

    if not metrics_csv.is_file():
        return []
    with open(metrics_csv, newline="", encoding="utf-8") as fh:
        rows = [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
    return [r for r in rows if float(r.get("step", 0)) <= step]


def _wandb_settings():
    import wandb

    # A run never waits on the network: no console capture, no code saving, quiet start; no
    # system metadata either, since it records the command line (which may carry secrets).
    return wandb.Settings(console="off", save_code=False, silent=True, x_disable_stats=True, x_disable_meta=True)
