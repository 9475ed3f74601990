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

        return run_lm_eval(model, tokenizer, cfg.eval, offline=cfg.offline, progress=cfg.trainer.progress_bar)
    from llmexp.plugins.evaluation import run_eval

    flat = run_eval(cfg.eval.name, model, tokenizer, cfg.eval.options, run_dir=run_dir, cfg=cfg,
                    key="eval.options")
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


def fresh_results_path(directory: Path) -> Path:
    """``directory``/results.json, or results-2.json, -3, ... when it is taken: the results a run
    recorded in training, and earlier evaluations, are kept. A registered eval's details (its
    ``run_dir``) go beside them, into the directory of the same name (results-2/)."""
    directory = Path(directory)
    n = 1
    while any((directory / (("results" if n == 1 else f"results-{n}") + end)).exists() for end in (".json", "")):
        n += 1
    return directory / ("results.json" if n == 1 else f"results-{n}.json")


def record_anew(table: Dict[str, Dict[str, Any]], path: Path) -> Path:
    """``table`` written to ``path`` (from :func:`fresh_results_path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
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


def evaluation_callback(cfg: RunConfig, run_dir: Path):
    """The Lightning callback that runs ``cfg.eval`` before training (unless resuming), every
    ``eval.every_n_steps`` steps, at each validation in training when ``trainer.monitor`` is one of
    its metrics (``metrics_at`` gives them to every rank), and after training (``after_training``,
    once the run has the model it exports: the best validation's under trainer.keep_best; an
    lm-eval of those same weights in training is reused, not run again); rank 0 evaluates the whole model
    (sharded models are gathered by every rank first), records it under eval/ and logs it. Its
    ``summary()`` is what summary.json gets."""
    from lightning.pytorch.callbacks import Callback

    monitor = cfg.trainer.monitor if (cfg.trainer.monitor or "").startswith("eval/") else None

    class Evaluation(Callback):
        def __init__(self) -> None:
            self.initial: Optional[Dict[str, Dict[str, Any]]] = None
            self.final: Optional[Dict[str, Dict[str, Any]]] = None
            # The eval after training that raised: said once the trained model is exported and
            # the run recorded (raised here, it lost the export of a finished run).
            self.failed: Optional[BaseException] = None
            self.steps: set = set()  # every rank: the steps evaluated in training
            self.tables: Dict[int, Dict[str, Dict[str, Any]]] = {}  # rank 0: their results
            self.monitored: Dict[int, Dict[str, float]] = {}  # every rank: the flat results trainer.monitor reads

        def on_fit_start(self, trainer, pl_module) -> None:
            if cfg.eval.before_training and trainer.ckpt_path is None:
                self.initial = self._evaluate(trainer, pl_module, record_as="initial", log=True)  # row 0
                if monitor:  # a misspelt monitor is said now, not after the steps to the first validation
                    self._check_monitor(self._shared(trainer, self.initial))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            every = cfg.eval.every_n_steps
            if every and trainer.global_step % every == 0:
                self._evaluate_in_training(trainer, pl_module)

        def on_validation_end(self, trainer, pl_module) -> None:
            if not monitor or trainer.sanity_checking or not trainer.global_step:
                return  # trainer.monitor's candidates: the validations after the first step (the last one's too)
            flat = self._shared(trainer, self._evaluate_in_training(trainer, pl_module))
            self._check_monitor(flat)
            self.monitored = {trainer.global_step: flat}

        def metrics_at(self, step: int) -> Dict[str, float]:
            """The eval's flat metrics at ``step``'s validation in training (every rank; {} if none)."""
            return dict(self.monitored.get(step, {}))

        def after_training(self, trainer, pl_module, model_step: Optional[int] = None) -> None:
            """The eval after training, on the model the run exports (called by the run), whose
            weights are those of ``model_step`` (default: the last step)."""
            step = trainer.global_step if model_step is None else model_step
            # A plugin eval is run again: in training it got no run_dir, so the details it writes
            # there (its per-prompt answers) were still those of the eval before training.
            if step in self.steps and cfg.eval.name == "lm_eval":  # evaluated with these weights, and logged
                self.final = self.tables.get(step)
                if self.final is not None:
                    record(self.final, run_dir, "results")
            else:
                self.final = self._evaluate(trainer, pl_module, record_as="results", log=step not in self.steps)
            if self.final is not None:
                print_table(self.final, f"eval after {trainer.global_step} steps")

        def _evaluate_in_training(self, trainer, pl_module):
            step = trainer.global_step
            if step not in self.steps:  # every_n_steps and the validation at one step: evaluated once
                self.steps.add(step)
                table = self._evaluate(trainer, pl_module, log=True)
                if table is not None:
                    self.tables[step] = table
            return self.tables.get(step)

        @staticmethod
        def _shared(trainer, table) -> Dict[str, float]:
            flat = flatten(table) if table is not None else {}
            return trainer.strategy.broadcast(flat, src=0) if trainer.world_size > 1 else flat

        @staticmethod
        def _check_monitor(flat: Dict[str, float]) -> None:
            if monitor not in flat:
                from llmexp.errors import UserError

                raise UserError(f"trainer.monitor={monitor}: eval={cfg.eval.name} reports "
                                f"{', '.join(sorted(flat)) or 'nothing'}; set trainer.monitor to one of them")

        def _evaluate(self, trainer, pl_module, record_as: Optional[str] = None, log: bool = False):
            model = pl_module.whole_model()  # a collective under fsdp/tp
            table = None
            if trainer.is_global_zero:
                try:
                    table = evaluate(cfg, model, pl_module.tokenizer, run_dir if record_as else None)
                except Exception as e:  # noqa: BLE001 - re-raised by the run once its model is exported
                    if record_as != "results":
                        raise
                    self.failed = e
                    return None
                if record_as:
                    record(table, run_dir, record_as)
                for logger in trainer.loggers if log else ():
                    logger.log_metrics(flatten(table), step=trainer.global_step)
            if pl_module.is_model_parallel:
                trainer.strategy.barrier("llmexp-eval")
            return table

        def summary(self) -> Dict[str, Any]:
            if self.failed is not None:
                return {"eval_error": str(self.failed)}
            if self.final is None:
                return {}
            out: Dict[str, Any] = {"eval": self.final, "eval_results": str(Path(run_dir) / "eval" / "results.json")}
            if self.initial is not None:
                out["eval_initial"] = self.initial
            return out

    return Evaluation()
