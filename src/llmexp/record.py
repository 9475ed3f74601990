"""The run record other tools rely on: config.yaml, summary.json, metrics.csv, loss_curve.png.

Files are written atomically (temp file, then rename) so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class RunDir:
    """A run directory: the one place that knows where its record, checkpoints and model live
    (run, eval, generate, pipeline, sweep and resume all ask it)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def loss_curve(self) -> Path:
        return self.path / "loss_curve.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def overrides_file(self) -> Path:
        return self.path / "overrides.yaml"

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def answers(self) -> Path:
        return self.path / "answers.jsonl"

    def overrides(self) -> Optional[List[str]]:
        """The command-line overrides the run started with (None for a record without them)."""
        import yaml

        return yaml.safe_load(self.overrides_file.read_text()) if self.overrides_file.is_file() else None

    def finished(self) -> bool:
        return self.summary_file.is_file()

    def summary(self) -> Optional[Dict[str, Any]]:
        return json.loads(self.summary_file.read_text()) if self.finished() else None

    def held(self) -> List[str]:
        """The record files already here (a new run must not overwrite them)."""
        return [p.name for p in (self.config, self.summary_file, self.checkpoints) if p.exists()]

    def would_overwrite(self) -> List[str]:
        """The files here that a new run writes: a run's record, or a user's own metrics.csv or
        model/ that a run started here would have replaced."""
        return [p.name for p in (self.config, self.summary_file, self.checkpoints, self.metrics, self.loss_curve,
                                 self.model, self.answers) if p.exists()]

    def checkpoint_to_resume(self) -> Optional[Path]:
        """The newest complete checkpoint: last.ckpt (a file, or a sharded checkpoint directory),
        else the highest step-*.ckpt."""
        if self.last_checkpoint.exists():
            return self.last_checkpoint
        steps = self.step_checkpoints()
        return steps[-1] if steps else None

    def step_checkpoints(self) -> List[Path]:
        """checkpoints/step-N.ckpt (files, or sharded checkpoint directories), by step."""
        steps = [p for p in self.checkpoints.glob("step-*.ckpt") if p.stem.split("-", 1)[1].isdigit()]
        return sorted(steps, key=lambda p: int(p.stem.split("-", 1)[1]))

    @property
    def tokenizer(self) -> Path:
        """checkpoints/tokenizer/: the run's tokenizer, saved as training starts, so that a checkpoint
        of a run that has not finished (no model/ yet) can be exported."""
        return self.checkpoints / "tokenizer"


def prompt_text(prompt: Any) -> str:
    """A recorded prompt as one line of text for a table: a string as it is, a chat as its messages' text."""
    if isinstance(prompt, list):
        return " | ".join(f"{m.get('role')}: {m.get('content')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def append_answers(run_dir: Path, step: int, answers: List[Dict[str, Any]]) -> None:
    """answers.jsonl: a line per recorded greedy answer of a validation, ``{"step", "prompt", "answer", "score"}``."""
    with open(RunDir(run_dir).answers, "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"step": step, **a}, ensure_ascii=False) + "\n" for a in answers)


def keep_answers_up_to(run_dir: Path, step: int) -> None:
    """A resumed run validates again after its checkpoint's step: the lines of those later steps the
    killed run wrote go (as metrics.csv's rows do)."""
    path = RunDir(run_dir).answers
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        write_atomic(path, "".join(line + "\n" for line in kept))


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint (a file, or a sharded checkpoint directory) was saved at."""
    import torch

    path = Path(path)
    if path.is_dir():  # sharded: the non-tensor state lives in meta.pt
        return int(torch.load(path / "meta.pt", map_location="cpu", weights_only=True)["global_step"])
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def run_of_model(model_dir: Path) -> Optional[RunDir]:
    """The run a model directory belongs to: ``<run>/model``, or a checkpoint's export
    ``<run>/exports/step-N`` (its task settings, answer length and name are the run's); else None."""
    model_dir = Path(model_dir)
    parent = model_dir.parent
    run = parent if model_dir.name == "model" else parent.parent if parent.name == "exports" else None
    return RunDir(run) if run is not None and RunDir(run).config.is_file() else None


def model_dir_of(target: str, key: str = "run") -> Path:
    """The exported language model of ``target``: a run directory (its model/), ``run=<dir>``,
    ``model=<dir>`` or a model directory itself. A reward model or a directory without
    config.json is refused with a UserError naming ``key``."""
    from llmexp.errors import UserError
    from llmexp.models.build import check_not_a_reward_model

    path = Path(target.split("=", 1)[1] if target.startswith(("run=", "model=")) else target)
    for candidate in (RunDir(path).model, path):
        if (candidate / "config.json").is_file():
            check_not_a_reward_model(candidate, key)
            return candidate
        if (candidate / ADAPTER_CONFIG).is_file():  # peft.merge_on_export=false: LoRA adapters on their base
            adapter_base(candidate, key)
            return candidate
    if not path.exists():
        raise UserError(f"{key}: {str(path)!r} does not exist; give a finished run's directory or an exported model")
    if path.is_file():
        # a file of a run's model/ or checkpoints/ (last.ckpt): the run it belongs to, which was "checkpoints/"
        inner = path.parent.name in ("model", "checkpoints") and (path.parent.parent / "model").is_dir()
        run = path.parent.parent if inner else path.parent
        raise UserError(f"{key}: {str(path)!r} is a file; give the directory it is in"
                        + (f" ({run})" if inner or (path.parent / "config.json").is_file()
                           or (path.parent / "model").is_dir() else ""))
    trials = sorted(p.parent for p in path.glob("*/summary.json"))
    if trials and not RunDir(path).config.is_file():
        raise UserError(f"{key}: {str(path)!r} holds runs ({', '.join(p.name for p in trials[:3])}"
                        f"{', ...' if len(trials) > 3 else ''}), not a model; give one of them, e.g. {trials[0]}")
    record = RunDir(path)
    if record.config.is_file() and not record.finished():
        how = (f"resume it (its overrides and resume={path})" if record.checkpoint_to_resume() is not None
               else "it wrote no checkpoint: start it over")
        raise UserError(f"{key}: {str(path)!r} is a run that did not finish, so it has no model/ yet; {how}, or "
                        f"give a finished run")
    raise UserError(f"{key}: {str(path)!r} is neither a run directory with model/ nor a model directory "
                    f"(no config.json); give a run directory or an exported model")


ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(adapter_dir: Path, key: str) -> str:
    """The base model LoRA adapters exported without merging refer to (their
    adapter_config.json's base_model_name_or_path), which must exist to load them."""
    from llmexp.errors import UserError

    base = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    hub_id = bool(base) and not os.path.isabs(base) and not base.startswith(".") and base.count("/") == 1
    if not base or not (os.path.isdir(base) or hub_id):
        raise UserError(f"{key}: {str(adapter_dir)!r} holds LoRA adapters whose base model "
                        f"({base or 'not named'}) cannot be found; give its run's merged export, or train with "
                        f"peft.merge_on_export=true")
    return base


def load_language_model(model_dir: Path) -> Tuple[Any, Any]:
    """(model in eval mode, tokenizer) of an exported model directory; LoRA adapters exported
    without merging (peft.merge_on_export=false) are loaded onto their base and merged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmexp.models.build import load_pretrained

    from llmexp.models.tokenizer import holds_no_tokenizer, no_tokenizer_error

    if holds_no_tokenizer(model_dir):
        raise no_tokenizer_error(model_dir, "run")
    tokenizer = load_pretrained(AutoTokenizer, model_dir, "run", "a tokenizer")
    if (Path(model_dir) / ADAPTER_CONFIG).is_file() and not (Path(model_dir) / "config.json").is_file():
        from peft import PeftModel

        base = load_pretrained(AutoModelForCausalLM, adapter_base(model_dir, "run"), "run", "a causal LM")
        return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload().eval(), tokenizer
    return load_pretrained(AutoModelForCausalLM, model_dir, "run", "a causal LM").eval(), tokenizer


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_config(run_dir: Path, resolved: Dict[str, Any]) -> None:
    from omegaconf import OmegaConf

    write_atomic(RunDir(run_dir).config, OmegaConf.to_yaml(OmegaConf.create(resolved)))


def write_summary(run_dir: Path, summary: Dict[str, Any]) -> None:
    write_atomic(RunDir(run_dir).summary_file, json.dumps(_jsonable(summary), indent=2) + "\n")


def read_metrics(path: Path) -> List[Dict[str, float]]:
    """Rows of a Lightning metrics CSV with empty cells dropped and numbers parsed."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def series(rows: List[Dict[str, float]], key: str) -> List[tuple]:
    return [(int(r["step"]), r[key]) for r in rows if key in r and "step" in r]


def plot_loss_curve(metrics_csv: Path, out_png: Path, title: str) -> bool:
    """Training loss (and validation loss at each validation) against optimizer step."""
    rows = read_metrics(metrics_csv)
    train, val = series(rows, "train/loss"), series(rows, "val/loss")
    if not train and not val:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train/loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val/loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(out_png).with_name(f".{Path(out_png).name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
    return True


def write_overrides(run_dir: Path, overrides: List[str]) -> None:
    """The command-line overrides of the run (secrets redacted), to repeat or resume it."""
    import yaml

    from llmexp.secrets import redact_override

    path = RunDir(run_dir).overrides_file
    # A resumed run keeps the overrides it started with; one started over in its directory (it had
    # stopped before its first checkpoint) kept the stopped session's, which no longer said what ran.
    if not path.exists() or RunDir(run_dir).checkpoint_to_resume() is None:
        write_atomic(path, yaml.safe_dump([redact_override(o) for o in overrides], default_flow_style=False))


def build_summary(typed, stage, trainer, data, *, run_dir: Path, resume_from: Optional[Path],
                  checkpoint: Optional[Path], fit_seconds: float, notes: Dict[str, Any]) -> Dict[str, Any]:
    """summary.json of a finished run (before its export, watchers and wall time are added)."""
    import torch

    from llmexp import __version__
    from llmexp.models.build import count_parameters

    tokens = stage.global_tokens()  # a collective: build_summary runs on every rank
    summary: Dict[str, Any] = {
        "llmexp_version": __version__,
        "run_name": typed.run_name,
        "run_dir": str(Path(run_dir).resolve()),
        "stage": typed.stage.name,
        "model": typed.model.name,
        "architecture": getattr(getattr(stage.model, "config", None), "model_type", None) or typed.model.architecture,
        "strategy": typed.strategy.name,
        "peft": typed.peft.name,
        "data": typed.data.name,
        "global_step": trainer.global_step,
        "resumed_from": str(resume_from) if resume_from else None,
        "initial": stage.initial_metrics,
        "final": dict(stage.last_val_metrics),
        "tokens_per_second": tokens / stage.train_seconds if stage.train_seconds else None,
        "train_tokens": tokens,
        "cpu_threads": torch.get_num_threads(),
        "fit_seconds": stage.seconds_before_resume["fit"] + fit_seconds,
        "seconds_to_first_step": stage.seconds_to_first_step,
        **count_parameters(stage.model),
        "data_stats": {"format": data.prepared.format, "preparation": data.prepared.log, **data.stats},
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        **stage.summary_extras(),
    }
    probe = getattr(stage, "task_probe", None)
    if probe is not None:
        summary["task"] = {"check": probe.check, "prompts": len(probe.rows), "max_new_tokens": probe.max_new_tokens,
                           **({"too_long_left_out": probe.too_long} if probe.too_long else {})}
    if resume_from:  # wall_seconds and fit_seconds include the sessions before, up to the checkpoint
        summary["seconds_before_resume"] = {k: round(v, 3) for k, v in stage.seconds_before_resume.items()}
    if stage.lr_changed_on_resume:
        summary["lr_changed_on_resume"] = stage.lr_changed_on_resume
    summary.update(notes)
    return summary


def finish_record(trainer, run_dir: Path, summary: Dict[str, Any], started: float) -> None:
    """On rank 0: close the loggers, draw the loss curve, write summary.json, print the result."""
    for logger in trainer.loggers:
        logger.finalize("success")
    record = RunDir(run_dir)
    plot_loss_curve(record.metrics, record.loss_curve, f"{summary['stage']} · {summary['model']} · {summary['data']}")
    summary["wall_seconds"] = summary.get("seconds_before_resume", {}).get("wall", 0.0) + time.time() - started
    write_summary(run_dir, summary)
    print_result(summary)


def data_cut(summary: Dict[str, Any]) -> Optional[str]:
    """What the training rows lost to data.max_length, said where the user looks (summary.json's
    data_stats alone held it: a third of a user's data dropped, two thirds cut, and nothing printed)."""
    train = (summary.get("data_stats") or {}).get("train") or {}
    parts = [f"{train[k]} {what}" for k, what in (
        ("truncated", "cut to data.max_length"), ("dropped_overlong", "dropped as longer (data.overlong=drop)"),
        ("dropped_no_target", "dropped with nothing left to learn once cut")) if train.get(k)]
    if not parts:
        return None
    split = ("; data.overlong=split keeps the rest of each as rows of its own" if train.get("truncated")
             and summary.get("stage") == "pretrain" else "")
    return f"of {train.get('samples', '?')} training samples, {', '.join(parts)} (data_stats in summary.json){split}"


def reward_lines(summary: Dict[str, Any]) -> List[str]:
    """What a rollout stage's val/reward measures, beside the task metric it can differ from."""
    v = summary.get("val_reward")
    if not v or "val/reward" not in (summary.get("final") or {}):
        return []
    penalty = v.get("missing_eos_penalty")
    ends = f", {penalty:+g} for one that does not end" if penalty else ""
    return [f"  (val/reward: the reward trained on, {v['reward']}, of greedy answers of at most "
            f"{v['max_new_tokens']} tokens{ends})"]


def best_lines(summary: Dict[str, Any]) -> List[str]:
    """What trainer.monitor found: the best validation, whether its model is the one exported, an early stop."""
    lines = []
    stopped = summary.get("stopped_early")
    if stopped:
        lines.append(f"  stopped early at step {stopped['step']}: {stopped['reason']}")
    best = summary.get("best") or {}
    if best.get("step") is not None:
        found = f"step {best['step']} of {summary['global_step']} ({best['monitor']} {best['value']:.4f})"
        lines.append(f"  model: the best validation's, {found}; the final metrics are its" if best["exported"]
                     else f"  best validation: {found}; the model is the last step's (trainer.keep_best=true "
                          f"exports the best)")
    lines.extend(f"  [yellow]best[/]: {note}" for note in best.get("notes", []))
    return lines


def print_result(summary: Dict[str, Any]) -> None:
    """The run's result on the console: initial -> final of every validation metric."""
    from rich.console import Console

    i, f = summary["initial"], summary["final"]
    lines = [f"[bold]{summary['stage']}[/] {summary['model']}: {summary['global_step']} steps in "
             f"{summary['wall_seconds']:.1f}s"]
    ep = summary.get("epochs")
    if ep:
        lines.append(f"  trainer.epochs={ep['epochs']:g}: {ep['steps_per_epoch']} steps per pass over "
                     f"{ep['rows']} training rows, {ep['max_steps']} steps")
    for key in sorted(set(i) | set(f)):
        mark = "  [bold]<- task metric[/]" if key == "val/task_score" else ""
        lines.append(f"  {key}: {i.get(key, float('nan')):.4f} -> {f.get(key, float('nan')):.4f}{mark}")
    if "task" in summary:
        t = summary["task"]
        left_out = (f"; {t['too_long_left_out']} longer than the model's context with the answer, left out"
                    if t.get("too_long_left_out") else "")
        cap = f" of at most {t['max_new_tokens']} tokens" if t.get("max_new_tokens") else ""
        asked = f"{t['prompts']} prompt{'s' if t['prompts'] != 1 else ''}"
        lines.append(f"  (val/task_score: greedy answers{cap} to {asked}, checked by {t['check']}{left_out})")
    lines.extend(reward_lines(summary))
    lines.extend(best_lines(summary))
    pruned = (summary.get("pruning") or {}).get("task_score_before_recovery")
    if pruned is not None:
        lines.append(f"  (pruned, before recovery: val/task_score {pruned:.4f})")
    cut = data_cut(summary)
    if cut:
        lines.append(f"  [yellow]data[/]: {cut}")
    for note in summary.get("notes", []):  # the data's warnings, printed before training too
        if note.startswith("data: "):
            lines.append(f"  [yellow]data[/]: {note[len('data: '):]}")
    for w in summary.get("health", {}).get("warnings", []):
        lines.append(f"  [yellow]health warning[/] at step {w['step']}: {w['sign']}: {w['seen']}")
    lines.append(f"  run record: {summary['run_dir']}")
    # soft_wrap: a long line is the terminal's to wrap (a log file broke it mid-phrase at 80 columns)
    Console(stderr=True, soft_wrap=True).print("\n".join(lines))
