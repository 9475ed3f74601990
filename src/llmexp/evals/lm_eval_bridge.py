"""lm-evaluation-harness on an in-memory model: HFLM over the model and tokenizer objects."""

from __future__ import annotations

import contextlib
import logging
import math
import subprocess
import sys
from typing import Any, Dict, Iterator, List

from llmexp.config.schema import EvalConfig
from llmexp.errors import UserError, suggest
from llmexp.evals.tasks import bundled_task_dir


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextlib.contextmanager
def _quiet_git_hash():
    """lm-eval records the git commit of the working directory by running ``git describe``, whose
    "fatal: not a git repository" went to the user's terminal from any directory outside git. The
    same lookup, its stderr dropped."""
    import os

    import lm_eval.evaluator as evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def git_hash():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def task_manager(cfg: EvalConfig, tasks: List[str], offline: bool):
    """Bundled tasks plus ``include_path``; lm-eval's own registry only when a task is not local."""
    from lm_eval.tasks import TaskManager

    paths = [str(bundled_task_dir())] + ([cfg.include_path] if cfg.include_path else [])
    tm = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing and not offline:
        tm = TaskManager(include_path=paths, include_defaults=True)
        missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise UserError(f"eval.tasks: unknown task(s) {missing}; {suggest(missing[0], tm.all_tasks)}")
    return tm


@contextlib.contextmanager
def _progress_bars(shown: bool) -> Iterator[None]:
    """lm-eval's tqdm bars ("Running loglikelihood requests") only where asked and on a terminal:
    in a sweep trial's log, or with trainer.progress_bar=false, they were lines of noise."""
    if shown and sys.stderr.isatty():
        yield
        return
    from tqdm import tqdm

    original, init = tqdm.__dict__["__init__"], tqdm.__init__  # the descriptor, and what it gives

    def quiet(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    tqdm.__init__ = quiet
    try:
        yield
    finally:
        tqdm.__init__ = original


def run_lm_eval(model, tokenizer, cfg: EvalConfig, offline: bool = True,
                progress: bool = True) -> Dict[str, Dict[str, Any]]:
    """task -> metric -> value (lm-eval's "metric,filter" keys become "metric"), and ``samples``:
    how many of the task's documents were asked (``eval.limit`` / ``--limit`` can make it fewer
    than the task has, and a result on 50 documents read as one on all of them); ``progress``:
    lm-eval's progress bars, on a terminal."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tm = task_manager(cfg, list(cfg.tasks), offline)
    was_training = model.training
    model.eval()
    lm_eval_logger = logging.getLogger("lm_eval")
    level = lm_eval_logger.level
    lm_eval_logger.setLevel(logging.ERROR)  # HFLM's notes on being handed a model object: llmexp's way
    try:
        # A PEFT model (adapters active) is evaluated as it is: HFLM takes it like a plain model.
        # think_end_token: a reasoning model's answer is scored, not its reasoning (llmexp.reasoning);
        # an answer without the marker is kept whole.
        from llmexp.reasoning import CLOSE

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size,
                  max_length=getattr(model.config, "max_position_embeddings", None),
                  device=str(next(model.parameters()).device), think_end_token=CLOSE)
        with torch.no_grad(), _quiet_git_hash(), _progress_bars(progress):
            out = simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=tm, limit=cfg.limit,
                                  num_fewshot=cfg.num_fewshot, apply_chat_template=cfg.apply_chat_template,
                                  log_samples=False, verbosity="ERROR",
                                  gen_kwargs=f"max_gen_toks={cfg.max_gen_toks}")
    finally:
        lm_eval_logger.setLevel(level)
        model.train(was_training)
    table: Dict[str, Dict[str, Any]] = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            name, _, flt = key.partition(",")
            if name in ("alias", "sample_len") or name.endswith("_stderr") \
                    or not isinstance(_plain(value), (int, float)):
                continue
            row[name if flt in ("none", "") else f"{name}_{flt}"] = _plain(value)
        counted = (out.get("n-samples") or {}).get(task) or {}
        if "effective" in counted:
            row["samples"] = int(counted["effective"])
        table[task] = row
    return table
