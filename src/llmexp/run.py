"""One run, start to end: config -> data -> tokenizer + model -> stage -> Trainer -> record."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Collection, Dict, Iterator, List, Optional, Sequence

from omegaconf import DictConfig

from llmexp.env import configure_environment, quiet_libraries
from llmexp.errors import UserError
from llmexp.faults import TrainingFault, explain_disk_full
from llmexp.preflight import preflight
from llmexp.record import (RunDir, build_summary, checkpoint_step, data_cut, finish_record, keep_answers_up_to,
                           write_config, write_overrides)
from llmexp.run_lock import RunLock
from llmexp.secrets import redact
from llmexp.serving.feedback import feedback_record


def run(cfg: DictConfig, run_dir: Optional[Path] = None, callbacks: Sequence[Any] = (),
        started: Optional[float] = None) -> float:
    """Train as ``cfg`` says, write the run record into ``run_dir``; return the final val/loss.

    ``callbacks`` are extra Lightning callbacks (for library use and tests); ``started``: when the
    run began (the command line's start; default now), which wall_seconds and
    seconds_to_first_step count from.
    """
    started = time.time() if started is None else started
    typed = preflight(cfg)
    run_dir = Path(run_dir or hydra_run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):  # a second run or resume on this directory is refused, naming this one
        refuse_a_held_directory(typed, run_dir)
        clean_partials(run_dir)
        failed = True
        try:
            with explain_disk_full(run_dir):  # one message naming the kept checkpoint, no traceback
                final = train_and_record(typed, run_dir, callbacks, started)
            failed = False
            return final
        finally:
            finish_tracker(failed)


def refuse_a_held_directory(typed, run_dir: Path) -> None:
    """Never a new run over a run's record: the command line checks hydra.run.dir and hydra.sweep.dir
    before Hydra starts, and this each job's own directory (a -m with hydra.sweep.subdir=same wrote
    job 1 over job 0, and left job 0's overrides.yaml beside job 1's config)."""
    from llmexp.run_lock import distributed_child

    written = RunDir(run_dir).would_overwrite()
    if typed.resume is None and written and not distributed_child():  # ranks > 0 join rank 0's run
        raise UserError(f"{run_dir} already holds a run ({', '.join(written)}), which this one would write over; "
                        f"give each run its own directory (under -m: leave hydra.sweep.subdir at its default, "
                        f"the job's number, and hydra.sweep.dir new)")


def finish_tracker(failed: bool) -> None:
    """End this process's W&B run: a Hydra multirun trains its jobs in one process, and each later
    job's WandbLogger reused the first job's run (its metrics went into job 0's directory)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


def clean_partials(run_dir: Path) -> None:
    """Remove the partial files a killed or failed save left (their writer is gone; this process
    holds the directory), and say so."""
    from llmexp.checkpointing import remove_stale_partials
    from llmexp.run_lock import distributed_child

    if distributed_child():
        return  # rank 0 holds the directory and cleans it
    removed = remove_stale_partials(run_dir)
    if removed:
        from rich.console import Console

        names = ", ".join(str(p.relative_to(run_dir)) for p in removed)
        Console(stderr=True, soft_wrap=True).print(
            f"removed {len(removed)} partial file(s) a killed or failed save left in {run_dir}: {names}", highlight=False)


def train_and_record(typed, run_dir: Path, callbacks: Sequence[Any], started: float) -> float:
    """The run itself, in a run directory this process holds."""
    from llmexp.checkpointing import check_steps_left, resolve_resume
    from llmexp.training import fit, save_last_checkpoint

    resume_from = resolve_resume(typed.resume, run_dir)  # a damaged checkpoint is refused here, record untouched
    if typed.resume is not None and RunDir(run_dir).config.is_file():
        # a resumed run must train what it trained before; said first: another stage's max_steps is no fix
        check_resumable(RunDir(run_dir).config, redact(dataclasses.asdict(typed)))
    if resume_from is not None and not typed.trainer.epochs:  # with epochs: once the rows are counted
        check_steps_left(resume_from, typed.trainer.max_steps)
    with discarded_on_refusal(run_dir):
        trainer, stage, data, watchers, notes = set_up(typed, run_dir, callbacks, resume_from)
    stage.session_started = started
    try:
        _, fit_seconds = fit(trainer, stage, data, resume_from)
    except UserError as e:  # a plugin's callback, a reward, trainer.monitor at a validation: where it stands
        if isinstance(e, (TrainingFault, Interrupted)) or not trainer.global_step:  # (those say it themselves)
            raise
        stopped = StoppedInTraining(f"{e}\n{standing(run_dir, trainer.global_step, 'stopped')}")
        stopped.exit_code = getattr(e, "exit_code", stopped.exit_code)
        raise stopped from e.__cause__
    except SystemExit:
        if trainer.interrupted:  # Ctrl+C: Lightning shut down and exited 1, saying nothing
            # A second Ctrl+C (a sweep or pipeline forwarding the terminal's) must not break the
            # message off with a traceback: the run is stopping already.
            with sigint_ignored():
                message = interrupted_message(run_dir, trainer.global_step)
            raise Interrupted(message, stopping_signal(trainer)) from None
        raise
    stopped = next((w for w in watchers if getattr(w, "stopped", None) is not None), None)
    # A health stop saves no checkpoint of the collapsed step: the run exports its best validation and ends.
    checkpoint = save_last_checkpoint(trainer, run_dir) if stopped is None else RunDir(run_dir).checkpoint_to_resume()
    after_training(watchers, trainer, stage)
    # built before the export, which merges adapters (the trained model's parameter counts)
    summary = build_summary(typed, stage, trainer, data, run_dir=run_dir, resume_from=resume_from,
                            checkpoint=checkpoint, fit_seconds=fit_seconds, notes=notes)
    exported = stage.export(RunDir(run_dir).model)
    if trainer.is_global_zero:
        for facts in (exported, *(w.summary() for w in watchers)):
            summary.update(facts)
        finish_record(trainer, run_dir, redact(summary), started)
    raise_failed_eval(watchers, run_dir)
    if stopped is not None:
        raise stopped.stop_error(RunDir(run_dir).model)
    return float(stage.last_val_metrics.get("val/loss", float("nan")))  # the exported model's


def after_training(watchers: Sequence[Any], trainer, stage) -> None:
    """Once the last step is checkpointed: the best validation's model back in place (trainer.keep_best),
    then the eval after training, on the model the run exports (that of ``model_step``)."""
    model_step = trainer.global_step
    for w in watchers:
        if hasattr(w, "restore"):
            model_step = w.restore(trainer, stage)
    for w in watchers:
        if hasattr(w, "after_training"):
            w.after_training(trainer, stage, model_step)


def raise_failed_eval(watchers: Sequence[Any], run_dir: Path) -> None:
    """The eval after training that failed, said now that the trained model is exported: a user
    error with how to evaluate the model again without training; anything else as it was raised."""
    failed = next((w.failed for w in watchers if getattr(w, "failed", None) is not None), None)
    if failed is None:
        return
    if not isinstance(failed, UserError):
        raise failed
    raise UserError(f"{failed}\nThe run trained and is recorded (its model: {RunDir(run_dir).model}; summary.json "
                    f"has eval_error). Once the eval is fixed, evaluate the model without training it again: "
                    f"python -m llmexp.eval {run_dir}") from failed


@contextlib.contextmanager
def discarded_on_refusal(run_dir: Path) -> Iterator[None]:
    """What this run wrote into its directory is removed again when it is refused before training
    (bad data, a teacher that does not fit): a directory holding only that would refuse the
    same hydra.run.dir as "already holds a run" once the problem is fixed."""
    from llmexp.run_lock import distributed_child

    before = set(os.listdir(run_dir))
    try:
        yield
    except (UserError, KeyboardInterrupt):  # refused, or stopped with Ctrl+C before training
        if not distributed_child():
            for name in set(os.listdir(run_dir)) - before:
                path = run_dir / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def set_up(typed, run_dir: Path, callbacks: Sequence[Any], resume_from):
    """The record started, the data prepared, the stage with its model(s), and the Trainer."""
    resolved = start_record(typed, run_dir)
    from llmexp.data.module import StageDataModule

    prepared, tokenizer = prepare_data(typed)  # data problems surface before any model
    check_references(typed, prepared)
    from llmexp.models.tokenizer import template_as_trained

    template_note = template_as_trained(tokenizer, typed.stage.name, prepared)
    import lightning as L

    quiet_libraries()  # after Lightning's import, which sets its own log levels
    from llmexp.loggers import build_loggers
    from llmexp.plugins import plugin_callbacks
    from llmexp.stages import stage_class
    from llmexp.training import build_trainer

    L.seed_everything(typed.trainer.seed, workers=True, verbose=False)
    stage = stage_class(typed.stage.name).create(typed, tokenizer)
    check_positions(typed, stage.model)
    data = StageDataModule(prepared, typed.data, typed.trainer, stage)
    data.setup()
    cut = data_cut({"stage": typed.stage.name, "data_stats": data.stats})
    if cut:  # said before the steps too: it was said only once they were spent on the cut rows
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[bold yellow]warning[/]: data: {cut}", highlight=False)
    epochs = steps_from_epochs(typed, data, run_dir, resume_from)  # before anything reads trainer.max_steps
    if epochs:
        resolved = redact(dataclasses.asdict(typed))
    notes = {**run_notes(typed, stage), **feedback_record(typed.data, prepared), **epochs}
    if resume_from is not None:  # overrides.yaml keeps the first session's; config.yaml is this one's
        from llmexp.secrets import redact_override

        notes["resume_overrides"] = [redact_override(o) for o in hydra_overrides()]
    said = [next((e["note"] for e in prepared.log if e.get("step") == step), None) for step in ("turn_end", "as_chat")]
    watchers = watching_callbacks(typed, run_dir, stage, prepared, data.val_dropped)
    notes["notes"] = [*notes.get("notes", []), *(n for n in (template_note, *said) if n),
                      *data_notes(prepared, typed.data.source), *stage_notes(stage)]
    if not notes["notes"]:
        del notes["notes"]
    if resume_from is not None:
        keep_answers_up_to(run_dir, checkpoint_step(resume_from))
    loggers = build_loggers(typed.logger, run_dir, display_name(typed.run_name), resolved,
                            typed.trainer.log_every_n_steps,
                            resume_step=checkpoint_step(resume_from) if resume_from else None)
    trainer = build_trainer(typed, run_dir, loggers, [*callbacks, *plugin_callbacks(typed), *watchers])
    replicas = (getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}).get("num_replicas", 1) \
        if typed.strategy.name not in ("fsdp", "tp") else None
    if epochs and replicas is not None and replicas != epochs["epochs"]["data_parallel_ranks"]:
        raise RuntimeError(f"trainer.epochs counted {epochs['epochs']['data_parallel_ranks']} data-parallel ranks, "
                           f"the trainer has {replicas}")
    return trainer, stage, data, watchers, notes


def check_positions(typed, model) -> None:
    """A pretrained model's positions hold data.max_length (and a rollout's new tokens after it);
    past them a model of learned positions (gpt2) failed in its first step with an IndexError. A
    model built from its config is checked before the run."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if typed.model.pretrained is None or not isinstance(positions, int):
        return
    rollout = getattr(typed.stage, "rollout", None)
    new_tokens = max(rollout.max_new_tokens, rollout.val_max_new_tokens or 0) if rollout is not None else 0
    if new_tokens and positions - new_tokens < 8:  # "set data.max_length=-88" was no fix
        raise UserError(f"stage.rollout.max_new_tokens: {new_tokens} new tokens leave no room for a prompt in the "
                        f"{positions} positions of {typed.model.pretrained}; lower it below {positions - 8}")
    if typed.data.max_length + new_tokens > positions:
        plus = f" plus stage.rollout.max_new_tokens={new_tokens}" if new_tokens else ""
        raise UserError(f"data.max_length: {typed.data.max_length}{plus} is more than the {positions} positions of "
                        f"{typed.model.pretrained}; set data.max_length={positions - new_tokens}")


def steps_from_epochs(typed, data, run_dir: Path, resume_from) -> Dict[str, Any]:
    """trainer.epochs as trainer.max_steps, once the data's rows are counted: set in the config the
    run trains by (and config.yaml); summary.json's ``epochs`` says how. {} without trainer.epochs."""
    t = typed.trainer
    if not t.epochs:
        return {}
    from llmexp.checkpointing import check_steps_left
    from llmexp.data.sampler import steps_for_epochs
    from llmexp.strategies import data_parallel_size

    ranks = data_parallel_size(typed)
    t.max_steps, per_epoch = steps_for_epochs(t.epochs, len(data.train_rows), t.micro_batch_size * t.grad_accum, ranks)
    write_config(run_dir, redact(dataclasses.asdict(typed)))
    if resume_from is not None:
        check_steps_left(resume_from, t.max_steps)
    return {"epochs": {"epochs": t.epochs, "rows": len(data.train_rows), "data_parallel_ranks": ranks,
                       "steps_per_epoch": per_epoch, "max_steps": t.max_steps}}


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ctrl+C ignored during the block (in the main thread, where signals are handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Interrupted(UserError):
    """The run was stopped with Ctrl+C (SIGINT): exit code 130, as a shell reports it; by SIGTERM
    (a timeout, Slurm's preemption, ``docker stop``): 143, as a process that SIGTERM ended."""

    exit_code = 130

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def stopping_signal(trainer) -> int:
    """The signal that asked the run to stop (training's StopRequest heard it), else SIGINT: a
    Ctrl+C before training, or the second one, which Lightning's own handling stopped."""
    from llmexp.checkpointing import RunCheckpoint

    heard = next((c.stop_request.signum for c in trainer.callbacks if isinstance(c, RunCheckpoint)), None)
    return heard or signal.SIGINT


class StoppedInTraining(UserError):
    """A user error raised while the run trained (a plugin's callback, say), with where it stands."""

    exit_code = 2


def interrupted_message(run_dir: Path, step: int) -> str:
    """Where an interrupted run stands and how to continue it."""
    return standing(run_dir, step, "interrupted")


def standing(run_dir: Path, step: int, how: str) -> str:
    """Where a run ``how`` (interrupted, stopped) at ``step`` stands, and how to continue it."""
    checkpoint = RunDir(run_dir).checkpoint_to_resume()
    if checkpoint is not None:
        return (f"{how} at step {step}; its last checkpoint ({checkpoint}, step "
                f"{checkpoint_step(checkpoint)}) is kept: continue with the same overrides and resume={run_dir}")
    return (f"{how} at step {step}, before any checkpoint was written (trainer.checkpoint_every_n_steps "
            f"sets how often), so there is nothing to resume: start it over in this directory with the same "
            f"overrides and hydra.run.dir={run_dir} resume=auto, or as a new run")


def prepare_data(typed):
    """(PreparedData, tokenizer). A text corpus goes through the token cache: with a tokenizer
    that does not depend on the data and a source known before loading, a cache hit skips
    loading and tokenizing altogether; other data is loaded, prepared and encoded as rows."""
    from llmexp.data.module import load_examples
    from llmexp.data.token_cache import peeked_format
    from llmexp.models.tokenizer import load_tokenizer

    d, m = typed.data, typed.model
    load = lambda: load_examples(d, typed.stage.name)  # noqa: E731
    if m.system_prompt is not None and (d.streaming or peeked_format(d) == "text"):
        raise no_system_prompt_for(d)
    if d.streaming:
        from llmexp.data.module import PreparedData

        if peeked_format(d) != "text" or m.tokenizer == "train":
            raise UserError("data.streaming: reads plain-text documents (a 'text' column, or data.fields.text=<column>) "
                            "with a tokenizer that exists before the data (not model.tokenizer=train)")
        tokenizer = load_tokenizer(m.tokenizer, m.pretrained, None, m.trust_remote_code, m.architecture,
                                   chat_template=m.chat_template, system_prompt=m.system_prompt)
        return PreparedData(train=None, val=None, format="text", log=[{"step": "streaming"}]), tokenizer
    if m.tokenizer != "train" and peeked_format(d) == "text":
        tokenizer = load_tokenizer(m.tokenizer, m.pretrained, None, m.trust_remote_code, m.architecture,
                                   chat_template=m.chat_template, system_prompt=m.system_prompt)
        return prepared_text(d, typed.stage.name, tokenizer, load), tokenizer
    prepared = load()
    tokenizer = load_tokenizer(m.tokenizer, m.pretrained, prepared.texts, m.trust_remote_code, m.architecture,
                               chat_template=m.chat_template, system_prompt=m.system_prompt)
    from llmexp.data.as_chat import rows_as_chat
    from llmexp.models.tokenizer import adopt_turn_end, own_chat_template

    # whose template the tokenizer carries: the pretrained model's, or model.tokenizer's (a Qwen2's ChatML
    # given so to a model built from its config got neither fix below)
    source = m.pretrained or (m.tokenizer if m.tokenizer not in (None, "train") else None)
    if m.chat_template is not None or (source is not None and own_chat_template(tokenizer)):
        key = "model.chat_template" if m.chat_template is not None else \
            "model.pretrained" if m.pretrained else "model.tokenizer"
        turn_end = adopt_turn_end(tokenizer, key)
        if turn_end:
            prepared.log.append({"step": "turn_end", "note": turn_end})
    as_chat = rows_as_chat(prepared, typed.stage.name, tokenizer, source, m.chat_template)
    if as_chat:
        prepared.log.append({"step": "as_chat", "note": as_chat})
    if m.system_prompt is not None and rendered_raw(prepared):
        raise no_system_prompt_for(d)
    from llmexp.config.stages import ROLLOUT_FORMATS, stage_spec
    from llmexp.data.rows import tool_calls_problem, tools_problem

    template, where = getattr(tokenizer, "chat_template", None), repr(d.path or d.name)
    rollout = stage_spec(typed.stage.name).formats == ROLLOUT_FORMATS
    for problem in (tools_problem(prepared.log, template, where, rollout),
                    tool_calls_problem(prepared.log, template, where)):
        if problem:
            raise UserError(problem)
    if prepared.format == "text":
        return prepared_text(d, typed.stage.name, tokenizer, load, prepared), tokenizer
    return prepared, tokenizer


def check_references(typed, prepared) -> None:
    """reference_match (the rollout stages' reward on a user's data) needs every training row's
    reference answer: said before any model, with the rows it lacks (prompt rows alone; kto rows
    labelled undesirable, whose completion is a wrong answer it would have rewarded)."""
    reward = getattr(typed.stage, "reward", None)
    train = getattr(prepared, "train", None)
    from llmexp.preflight import REFERENCE_REWARD

    if reward is None or reward.model or reward.function != REFERENCE_REWARD or train is None:
        return
    from llmexp.data.encode import as_prompt_row

    rows = list(train)
    missing = [i for i, row in enumerate(rows) if "completion" not in as_prompt_row(row)]
    if not missing:
        return
    where = repr(typed.data.path or typed.data.name)
    if prepared.format == "unpaired_preference":
        raise UserError(f"stage.reward.function: reference_match rewards an answer equal to the row's, and {len(missing)} "
                        f"of the {len(rows)} training rows of {where} are labelled undesirable: their completion is a "
                        f"wrong answer; fix: give the rows whose completion is right (label true), or a reward that "
                        f"checks answers: stage.reward.function=<registered name or module:function>")
    columns = sorted(rows[0]) if rows else []
    named = next((c for c in columns if c in ("answer", "response", "output", "target", "solution", "reference")), None)
    fix = f"data.fields.completion={named} (the column that holds the answer), " if named else \
        "prompt/completion rows (or chat rows ending with the answer), "
    raise UserError(f"stage.reward.function: reference_match rewards an answer equal to the row's reference answer, "
                    f"and {len(missing)} of the {len(rows)} training rows of {where} have none (columns: "
                    f"{', '.join(columns)}); fix: {fix}or stage.reward.function=<a registered reward or "
                    f"module:function>, or stage.reward.model=<rm run>/model")


def no_system_prompt_for(data_cfg) -> UserError:
    return UserError(f"model.system_prompt: {data_cfg.path or data_cfg.name!r} holds plain text (documents, or "
                     f"prompts trained as they are), which no chat template renders, so there is nowhere to put a "
                     f"system message; give chat rows (messages), or drop model.system_prompt")


def rendered_raw(prepared) -> bool:
    """Whether the run's rows are text that no chat template renders: documents, or plain-string prompts."""
    if prepared.format == "text":
        return True
    train = prepared.train
    return prepared.format != "chat" and train is not None and len(train) > 0 and isinstance(train[0]["prompt"], str)


def prepared_text(data_cfg, stage: str, tokenizer, load_examples, prepared=None):
    """PreparedData of a text corpus, read from its token cache (built here when missing, from
    ``prepared`` or ``load_examples()``)."""
    from llmexp.data.module import PreparedData
    from llmexp.data.token_cache import key_inputs, prepare_cached, summary_of

    inputs = key_inputs(data_cfg, tokenizer, stage, prepared)
    if inputs is None:  # a source known only once loaded: load it, and key the cache by its rows
        prepared = load_examples()
        inputs = key_inputs(data_cfg, tokenizer, stage, prepared)
    cache_dir, meta, hit = prepare_cached(inputs, (lambda: prepared) if prepared is not None else load_examples,
                                          tokenizer, data_cfg, data_cfg.num_proc)
    return PreparedData(train=None, val=None, format="text", log=meta["preparation"],
                        cache=summary_of(cache_dir, meta, hit, cache_dir.name))  # the rows' key names their dir


def hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def display_name(run_name: str) -> str:
    """The run's name in W&B: with its job number under Hydra's -m (every job was 'sft-llama')."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{run_name}-{HydraConfig.get().job.num}"
    return run_name


def hydra_overrides() -> List[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def start_record(typed, run_dir: Path) -> Dict[str, Any]:
    """Create the run directory and write config.yaml and overrides.yaml (secrets redacted; a
    resumed run's was checked against them before, in train_and_record). Returns the resolved,
    redacted config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    configure_environment(typed.offline)
    resolved = redact(dataclasses.asdict(typed))
    write_config(run_dir, resolved)
    write_overrides(run_dir, hydra_overrides())
    return resolved


def check_resumable(saved_config: Path, resolved: Dict[str, Any]) -> None:
    import yaml

    from llmexp.errors import ConfigError, UserError
    from llmexp.resume import incompatible_keys

    try:
        saved = yaml.safe_load(saved_config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        saved = e
    if not isinstance(saved, dict):
        why = (str(saved).splitlines() or ["empty"])[0][:160]
        raise UserError(f"resume: {saved_config} is not the config a run wrote ({why}); "
                        f"the run cannot be checked against it: start a new run with "
                        f"model.pretrained=<a model> instead of resuming")
    problems = incompatible_keys(saved, resolved)
    if problems:  # which run: resume=auto chose it
        from llmexp.errors import Problem

        raise ConfigError([*problems, Problem("resume", f"continues the run in {saved_config.parent}, started with "
                                              "other values of the keys above",
                                              "give the overrides it started with (its overrides.yaml), or drop "
                                              "resume= to start a new run")])


def stage_notes(stage) -> List[str]:
    """What the stage's set-up left out (the task metric), for summary.json's notes."""
    return [n for n in (getattr(stage, "task_missing", None),) if n]


def data_notes(prepared, source: str) -> List[str]:
    """The data's warnings (rows with an empty answer; most of a user's rows removed as duplicates:
    a registered dataset's generator repeats by design), printed before training and kept in notes."""
    from llmexp.data.fields import diverging_note
    from llmexp.data.prepare import dedup_note
    from llmexp.data.rows import empty_answers_note

    duplicates = dedup_note(prepared.log) if source in ("files", "hf") else None
    notes = [n for n in (empty_answers_note(prepared.log), duplicates, diverging_note(prepared.log)) if n]
    if notes:
        from rich.console import Console

        for note in notes:
            Console(stderr=True, soft_wrap=True).print(f"[bold yellow]warning[/]: {note}", highlight=False)
    return notes


def run_notes(typed, stage) -> Dict[str, Any]:
    """What the run does differently from what was asked, for summary.json (``notes``, and
    ``warmup_steps_used`` when the warm-up was clamped); the lr-scale warning is also printed."""
    from llmexp.config.stages import stage_spec
    from llmexp.health import lr_scale_note, reward_model_note
    from llmexp.models.build import count_parameters
    from llmexp.optim import effective_warmup
    from llmexp.task_probe import unavailable

    out: Dict[str, Any] = {}
    scale_note = lr_scale_note(typed.stage.name, count_parameters(stage.model)["parameters"], typed.optim.lr)
    reward_note = reward_model_note(getattr(typed.stage, "reward", None))
    for warning in (scale_note, reward_note):
        if warning:
            from rich.console import Console

            Console(stderr=True).print(f"[bold yellow]warning[/]: {warning}", highlight=False)
    notes = [n for n in (scale_note, reward_note,
                         unavailable(typed) if stage_spec(typed.stage.name).language_model else None) if n]
    warmup = effective_warmup(typed.optim.warmup_steps, typed.trainer.max_steps)
    if warmup != typed.optim.warmup_steps:
        out["warmup_steps_used"] = warmup
        notes.append(f"optim.warmup_steps={typed.optim.warmup_steps} clamped to {warmup} for "
                     f"trainer.max_steps={typed.trainer.max_steps}")
    if notes:
        out["notes"] = notes
    reward, rollout = getattr(typed.stage, "reward", None), getattr(typed.stage, "rollout", None)
    if reward is not None and rollout is not None:  # what val/reward is (it read as val/task_score again)
        out["val_reward"] = {"reward": f"the reward model {reward.model}" if reward.model else reward.function,
                             "max_new_tokens": rollout.val_max_new_tokens or rollout.max_new_tokens,
                             "missing_eos_penalty": reward.missing_eos_penalty}
    return out


def watching_callbacks(typed, run_dir: Path, stage, prepared, val_dropped: Collection[int] = ()) -> List[Any]:
    """The callbacks whose ``summary()`` summary.json records: the best validation (trainer.monitor),
    the health guard and the configured eval (and the task metric's probe, which the stage runs at
    each validation, on the held-out rows validation kept: not those ``val_dropped`` names)."""
    from llmexp.best_model import best_validation
    from llmexp.config.stages import stage_spec
    from llmexp.evals.runner import evaluation_callback
    from llmexp.health import HealthGuard, watched
    from llmexp.task_probe import build_probe

    if stage_spec(typed.stage.name).language_model:
        held_out = [r for i, r in enumerate(prepared.val if prepared.val is not None else []) if i not in val_dropped]
        probe = build_probe(typed, held_out, prepared.format)
        context = getattr(stage.model.config, "max_position_embeddings", None)
        if probe is not None and "task.max_new_tokens" not in {o.split("=", 1)[0] for o in hydra_overrides()}:
            fitted = probe.fit_to_references(stage.tokenizer, context)
            if fitted is not None:  # in the config the run is recorded (and served, and asked by generate) with
                from rich.console import Console

                Console(stderr=True, soft_wrap=True).print(
                    f"task.max_new_tokens: {typed.task.max_new_tokens} -> {fitted}, to fit the held-out answers "
                    f"(greedy answers are cut there)", highlight=False)
                typed.task.max_new_tokens = fitted
                write_config(run_dir, redact(dataclasses.asdict(typed)))
        stage.task_probe = probe.within_context(stage.tokenizer, context) if probe is not None else None
        if probe is not None and stage.task_probe is None:  # the metric vanished, not a word (README: every run)
            stage.task_missing = (f"no task metric: every one of the {len(probe.rows)} held-out prompts leaves "
                                  f"fewer than task.max_new_tokens={probe.max_new_tokens} of the model's {context} "
                                  f"positions to answer in; hold out shorter rows, or lower task.max_new_tokens")
            from rich.console import Console

            Console(stderr=True, soft_wrap=True).print(f"[bold yellow]warning[/]: {stage.task_missing}",
                                                       highlight=False)
    # In this order: the eval (run at the validations when trainer.monitor is one of its metrics), the
    # best validation, which reads it, and the health guard, which exports the best on a stop.
    evaluation = evaluation_callback(typed, run_dir) if typed.eval.name != "none" else None
    best = best_validation(typed, RunDir(run_dir).checkpoints, evaluation)
    out: List[Any] = [w for w in (evaluation, best) if w is not None]
    if watched(typed.stage.name) and typed.health.action != "off":
        rollout = getattr(typed.stage, "rollout", None)
        out.append(HealthGuard(typed.health, typed.stage.name, rollout.max_new_tokens if rollout else None, run_dir,
                               best))
    return out
