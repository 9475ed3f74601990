"""The run record other tools rely on: config.yaml, summary.json, metrics.csv, loss_curve.png.

Files are written atomically (temp file, then rename) so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List

RECORD_FILES = ("config.yaml", "summary.json", "metrics.csv", "loss_curve.png")


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

    write_atomic(Path(run_dir) / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))


def write_summary(run_dir: Path, summary: Dict[str, Any]) -> None:
    write_atomic(Path(run_dir) / "summary.json", json.dumps(_jsonable(summary), indent=2) + "\n")


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
