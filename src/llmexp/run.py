"""One run, start to end: config -> data -> tokenizer + model -> stage -> Trainer -> record."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from llmexp import __version__
from llmexp.preflight import preflight
from llmexp.env import configure_environment, quiet_libraries
from llmexp.record import RunDir, plot_loss_curve, write_config, write_overrides, write_summary
from llmexp.secrets import redact


def hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def hydra_overrides() -> List[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def final_eval(typed, stage, tokenizer, run_dir: Path, trainer) -> Dict[str, Any]:
    """Evaluate the trained model (sharded models: their gathered export) on rank 0 and record it."""
    from llmexp.evals.runner import evaluate, flatten, print_table, record

    model = stage.model
    if stage.is_model_parallel:
        from llmexp.record import load_language_model

        model = load_language_model(RunDir(run_dir).model)[0]
    table = evaluate(typed, model, tokenizer, run_dir)
    path = record(table, run_dir)
    for logger in trainer.loggers:
        logger.log_metrics(flatten(table), step=trainer.global_step)
    print_table(table, f"eval after {trainer.global_step} steps")
    return {"eval": table, "eval_results": str(path)}


def check_resumable(saved_config: Path, resolved: Dict[str, Any]) -> None:
    import yaml

    from llmexp.errors import ConfigError
    from llmexp.resume import incompatible_keys

    problems = incompatible_keys(yaml.safe_load(saved_config.read_text()), resolved)
    if problems:
        raise ConfigError(problems)


def run(cfg: DictConfig, run_dir: Optional[Path] = None, callbacks: Sequence[Any] = ()) -> float:
    """Train as ``cfg`` says, write the run record into ``run_dir``; return the final val/loss.

    ``callbacks`` are extra Lightning callbacks (for library use and tests).
    """
    started = time.time()
    typed = preflight(cfg)
    run_dir = Path(run_dir or hydra_run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    configure_environment(typed.offline)
    resolved = redact(dataclasses.asdict(typed))
    if typed.resume is not None and (run_dir / "config.yaml").is_file():
        check_resumable(run_dir / "config.yaml", resolved)
    write_config(run_dir, resolved)
    write_overrides(run_dir, hydra_overrides())

    from llmexp.data.module import load_examples

    prepared = load_examples(typed.data, typed.stage.name)  # data problems surface before any model

    import lightning as L

    quiet_libraries()  # after Lightning's import, which sets its own log levels
    from llmexp.checkpointing import checkpoint_step, resolve_resume
    from llmexp.data.module import StageDataModule
    from llmexp.faults import explain_faults
    from llmexp.loggers import build_loggers
    from llmexp.models.build import count_parameters
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.evals.runner import eval_callback, evaluate
    from llmexp.evals.runner import record as record_eval
    from llmexp.plugins import plugin_callbacks
    from llmexp.stages import stage_class
    from llmexp.training import build_trainer, save_last_checkpoint
    from llmexp.health import HealthGuard, lr_scale_note, watched
    from llmexp.optim import effective_warmup
    from llmexp.task_probe import build_probe, unavailable
    from llmexp.config.stages import stage_spec

    tokenizer = load_tokenizer(typed.model.tokenizer, typed.model.pretrained, prepared.texts,
                               typed.model.trust_remote_code)
    L.seed_everything(typed.trainer.seed, workers=True, verbose=False)
    stage = stage_class(typed.stage.name).create(typed, tokenizer)
    scale_note = lr_scale_note(typed.stage.name, count_parameters(stage.model)["parameters"], typed.optim.lr)
    if scale_note:
        from rich.console import Console

        Console(stderr=True).print(f"[bold yellow]warning[/]: {scale_note}", highlight=False)
    data = StageDataModule(prepared, typed.data, typed.trainer, stage)
    data.setup()
    if stage_spec(typed.stage.name).language_model:
        stage.task_probe = build_probe(typed, prepared.val, prepared.format)
    guard = None
    if watched(typed.stage.name) and typed.health.action != "off":
        rollout = getattr(typed.stage, "rollout", None)
        guard = HealthGuard(typed.health, typed.stage.name, rollout.max_new_tokens if rollout else None, run_dir)
    resume_from = resolve_resume(typed.resume, run_dir)

    loggers = build_loggers(typed.logger, run_dir, typed.run_name, resolved, typed.trainer.log_every_n_steps,
                            resume_step=checkpoint_step(resume_from) if resume_from else None)
    evaluating = typed.eval.name != "none"
    eval_callbacks = [eval_callback(typed)] if evaluating and typed.eval.every_n_steps else []
    guards = [guard] if guard else []
    trainer = build_trainer(typed, run_dir, loggers, [*callbacks, *plugin_callbacks(typed), *eval_callbacks, *guards])
    if evaluating and typed.eval.before_training and resume_from is None and trainer.is_global_zero:
        initial_eval = evaluate(typed, stage.model, tokenizer, run_dir)
        record_eval(initial_eval, run_dir, "initial")
    with explain_faults():
        if resume_from is None:
            trainer.validate(stage, datamodule=data, verbose=False)
            stage.initial_metrics = dict(stage.last_val_metrics)
        fit_started = time.time()
        trainer.fit(stage, datamodule=data, ckpt_path=str(resume_from) if resume_from else None,
                    weights_only=True)
        fit_seconds = time.time() - fit_started
        trainer.validate(stage, datamodule=data, verbose=False)
    final = dict(stage.last_val_metrics)
    checkpoint = save_last_checkpoint(trainer, run_dir)

    summary: Dict[str, Any] = {
        "llmexp_version": __version__,
        "run_name": typed.run_name,
        "run_dir": str(run_dir.resolve()),
        "stage": typed.stage.name,
        "model": typed.model.name,
        "architecture": typed.model.architecture,
        "strategy": typed.strategy.name,
        "peft": typed.peft.name,
        "data": typed.data.name,
        "global_step": trainer.global_step,
        "resumed_from": str(resume_from) if resume_from else None,
        "initial": stage.initial_metrics,
        "final": final,
        "tokens_per_second": stage.train_tokens / stage.train_seconds if stage.train_seconds else None,
        "train_tokens": stage.train_tokens,
        "fit_seconds": fit_seconds,
        "seconds_to_first_step": stage.seconds_to_first_step,
        **count_parameters(stage.model),
        "data_stats": {"format": prepared.format, "preparation": prepared.log, **data.stats},
        "checkpoint": str(checkpoint),
        **stage.summary_extras(),
    }
    probe = getattr(stage, "task_probe", None)
    if probe is not None:
        summary["task"] = {"check": probe.check, "prompts": len(probe.rows), "max_new_tokens": probe.max_new_tokens}
    if guard is not None:
        summary["health"] = guard.record()
    notes = [n for n in (scale_note, unavailable(typed) if stage_spec(typed.stage.name).language_model else None) if n]
    warmup = effective_warmup(typed.optim.warmup_steps, typed.trainer.max_steps)
    if warmup != typed.optim.warmup_steps:
        summary["warmup_steps_used"] = warmup
        notes.append(f"optim.warmup_steps={typed.optim.warmup_steps} clamped to {warmup} for "
                     f"trainer.max_steps={typed.trainer.max_steps}")
    if notes:
        summary["notes"] = notes
    summary.update(stage.export(RunDir(run_dir).model))
    if trainer.is_global_zero and evaluating:
        summary.update(final_eval(typed, stage, tokenizer, run_dir, trainer))
        if typed.eval.before_training and resume_from is None:
            summary["eval_initial"] = initial_eval
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.finalize("success")
        plot_loss_curve(RunDir(run_dir).metrics, RunDir(run_dir).loss_curve,
                        f"{typed.stage.name} · {typed.model.name} · {typed.data.name}")
        summary["wall_seconds"] = time.time() - started
        write_summary(run_dir, redact(summary))
        _print_result(summary)
    return float(final.get("val/loss", float("nan")))


def _print_result(summary: Dict[str, Any]) -> None:
    from rich.console import Console

    i, f = summary["initial"], summary["final"]
    lines = [f"[bold]{summary['stage']}[/] {summary['model']}: {summary['global_step']} steps in "
             f"{summary['wall_seconds']:.1f}s"]
    for key in sorted(set(i) | set(f)):
        mark = "  [bold]<- task metric[/]" if key == "val/task_score" else ""
        lines.append(f"  {key}: {i.get(key, float('nan')):.4f} -> {f.get(key, float('nan')):.4f}{mark}")
    if "task" in summary:
        t = summary["task"]
        lines.append(f"  (val/task_score: greedy answers to {t['prompts']} prompts, checked by {t['check']})")
    for w in summary.get("health", {}).get("warnings", []):
        lines.append(f"  [yellow]health warning[/] at step {w['step']}: {w['sign']}: {w['seen']}")
    lines.append(f"  run record: {summary['run_dir']}")
    Console(stderr=True).print("\n".join(lines))
