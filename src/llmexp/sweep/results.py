"""Reading a trial's result: the sweep metric out of its summary.json and metrics.csv."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from llmexp.record import RunDir, read_metrics


def metric_value(summary: Dict[str, Any], name: str) -> Optional[float]:
    """The metric as a finite number (None: absent, or NaN/inf)."""
    value = recorded_value(summary, name)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def recorded_value(summary: Dict[str, Any], name: str) -> Any:
    """``val/loss`` -> final validation loss; ``eval/<task>/<metric>`` -> summary["eval"][task][metric];
    anything else: a dotted path into summary.json. None where the run recorded no such metric."""
    if name in summary.get("final", {}):
        value = summary["final"][name]
    elif name.startswith("eval/") and name.count("/") >= 2:
        _, task, metric = name.split("/", 2)
        value = summary.get("eval", {}).get(task, {}).get(metric)
    else:
        value = summary
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    return value


def metric_names(summary: Dict[str, Any]) -> List[str]:
    """The metric names to suggest from this summary: its final validation metrics,
    eval/<task>/<metric>, and summary.json's own top-level numbers (wall_seconds, ...)."""
    names = list(summary.get("final", {}))
    names += [f"eval/{task}/{m}" for task, ms in summary.get("eval", {}).items() if isinstance(ms, dict) for m in ms]
    names += [k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return names


def trial_metric(run_dir: Path, name: str) -> Optional[float]:
    summary = RunDir(run_dir).summary()
    return metric_value(summary, name) if summary is not None else None


def history(run_dir: Path, name: str) -> List[Dict[str, float]]:
    """The metric at each logged step so far (for hyperband early termination)."""
    rows = read_metrics(RunDir(run_dir).metrics)
    return [{name: r[name], "_step": r.get("step", 0)} for r in rows if name in r]
