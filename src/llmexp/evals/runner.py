"""Run the configured eval on a model and record it: run directory, summary, logger, console."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from llmexp.config.schema import RunConfig
from llmexp.record import write_atomic


def evaluate(cfg: RunConfig, model, tokenizer, run_dir: Optional[Path] = None) -> Dict[str, Dict[str, Any]]:
    """task -> metric -> value for ``cfg.eval`` (lm-eval tasks, or a plugin eval by name)."""
    if cfg.eval.name == "lm_eval":
        from llmexp.evals.lm_eval_bridge import run_lm_eval

        return run_lm_eval(model, tokenizer, cfg.eval, offline=cfg.offline)
    from llmexp.plugins.evaluation import run_eval

    flat = run_eval(cfg.eval.name, model, tokenizer, cfg.eval.options, run_dir=run_dir, cfg=cfg)
    return {cfg.eval.name: {key.split("/", 1)[1]: value for key, value in flat.items()}}


def flatten(table: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """{"eval/<task>/<metric>": value}: the logger keys (and W&B sweep metric names)."""
    return {f"eval/{task}/{metric}": value for task, row in table.items() for metric, value in row.items()
            if isinstance(value, (int, float))}


def record(table: Dict[str, Dict[str, Any]], run_dir: Path, name: str = "results") -> Path:
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    write_atomic(path, json.dumps(table, indent=2) + "\n")
    return path


def print_table(table: Dict[str, Dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("task", "metric", "value"):
        t.add_column(col)
    for task, row in table.items():
        for metric, value in row.items():
            t.add_row(task, metric, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console(stderr=True).print(t)


def eval_callback(cfg: RunConfig):
    """A Lightning callback evaluating every ``eval.every_n_steps`` steps (rank 0), logged."""
    from lightning.pytorch.callbacks import Callback

    every = cfg.eval.every_n_steps

    class PeriodicEval(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % every:
                return
            model = pl_module.model
            if pl_module.is_model_parallel:  # every rank gathers; rank 0 evaluates a whole copy
                model = gathered_copy(pl_module.model, pl_module.full_state_dict(), trainer.is_global_zero)
            if trainer.is_global_zero:
                table = evaluate(cfg, model, pl_module.tokenizer)
                for logger in trainer.loggers:
                    logger.log_metrics(flatten(table), step=trainer.global_step)
            if pl_module.is_model_parallel:
                trainer.strategy.barrier("llmexp-periodic-eval")

    return PeriodicEval()


def gathered_copy(model, state: Dict[str, Any], build: bool):
    """A plain, unsharded model with the gathered weights (on rank 0; None elsewhere)."""
    if not build:
        return None
    from transformers import AutoModelForCausalLM

    copy = AutoModelForCausalLM.from_config(model.config)
    copy.load_state_dict(state)
    return copy.eval()
