"""The run record other tools rely on: config.yaml, summary.json, metrics.csv, loss_curve.png.

Files are written atomically (temp file, then rename) so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import json
import math
import os
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
    def model(self) -> Path:
        return self.path / "model"

    def finished(self) -> bool:
        return self.summary_file.is_file()

    def summary(self) -> Optional[Dict[str, Any]]:
        return json.loads(self.summary_file.read_text()) if self.finished() else None

    def held(self) -> List[str]:
        """The record files already here (a new run must not overwrite them)."""
        return [p.name for p in (self.config, self.summary_file, self.checkpoints) if p.exists()]

    def checkpoint_to_resume(self) -> Optional[Path]:
        """The newest complete checkpoint: last.ckpt (a file, or a sharded checkpoint directory),
        else the highest step-*.ckpt."""
        if self.last_checkpoint.exists():
            return self.last_checkpoint
        steps = sorted(self.checkpoints.glob("step-*.ckpt"), key=lambda p: int(p.stem.split("-")[1]))
        return steps[-1] if steps else None


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
    raise UserError(f"{key}: {str(path)!r} is neither a run directory with model/ nor a model directory "
                    f"(no config.json); give a run directory or an exported model")


def load_language_model(model_dir: Path) -> Tuple[Any, Any]:
    """(model in eval mode, tokenizer) of an exported model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval(), tokenizer


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

    path = Path(run_dir) / "overrides.yaml"
    if not path.exists():  # a resumed run keeps the overrides it started with
        write_atomic(path, yaml.safe_dump([redact_override(o) for o in overrides], default_flow_style=False))
