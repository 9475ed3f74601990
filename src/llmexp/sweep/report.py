"""The sweep report: a table of trials (CSV and Markdown), a plot, and the best trial."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Dict, List

from llmexp.record import write_atomic


def best_trial(trials, goal: str):
    done = [t for t in trials if t.status == "finished" and t.metric is not None]
    if not done:
        return None
    return min(done, key=lambda t: t.metric) if goal == "minimize" else max(done, key=lambda t: t.metric)


def rows(trials, metric: str) -> List[Dict[str, Any]]:
    keys = sorted({k for t in trials for k in t.params})
    return [{"trial": t.id, **{k: t.params.get(k) for k in keys}, metric: t.metric, "status": t.status,
             "seconds": round(t.seconds, 1), "run_dir": t.run_dir} for t in trials]


def write_report(out_dir: Path, trials, metric: str, goal: str, sweep_name: str) -> Dict[str, Any]:
    out_dir = Path(out_dir)
    table = rows(trials, metric)
    best = best_trial(trials, goal)
    buf = io.StringIO()
    if table:
        writer = csv.DictWriter(buf, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    write_atomic(out_dir / "report.csv", buf.getvalue())
    lines = [f"# Sweep {sweep_name}", "", f"Metric: `{metric}` ({goal}). Trials: {len(trials)}.", ""]
    if table:
        cols = list(table[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in table]
    lines += ["", f"**Best trial:** {best.id} ({metric} = {best.metric:.6g}) with "
              f"{', '.join(f'{k}={v}' for k, v in best.params.items())}, run directory `{best.run_dir}`"
              if best else "**Best trial:** none finished"]
    write_atomic(out_dir / "report.md", "\n".join(lines) + "\n")
    plotted = plot(out_dir / "report.png", trials, metric)
    return {"best": best, "plot": plotted}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def plot(path: Path, trials, metric: str) -> bool:
    """One parameter: metric against it (log x for learning rates). Several: parallel coordinates."""
    done = [t for t in trials if t.metric is not None]
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k in sorted({k for t in done for k in t.params})
               if all(isinstance(t.params.get(k), (int, float)) for t in done)]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if len(numeric) == 1:
        key = numeric[0]
        pts = sorted((t.params[key], t.metric) for t in done)
        ax.plot(*zip(*pts), "o-")
        if min(p[0] for p in pts) > 0 and max(p[0] for p in pts) / min(p[0] for p in pts) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    else:
        axes = numeric + [metric]
        values = {k: [t.params[k] for t in done] for k in numeric}
        values[metric] = [t.metric for t in done]
        scaled = {k: _unit(v, log=k.endswith("lr")) for k, v in values.items()}
        cmap = plt.get_cmap("viridis")
        m = scaled[metric]
        for i in range(len(done)):
            ax.plot(range(len(axes)), [scaled[k][i] for k in axes], color=cmap(m[i]), alpha=0.8)
        ax.set_xticks(range(len(axes)), axes, rotation=15)
        ax.set_yticks([])
        ax.set_title("parallel coordinates (each axis scaled to its range; colour = metric)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _unit(values: List[float], log: bool = False) -> List[float]:
    vals = [math.log10(v) if log and v > 0 else v for v in values]
    lo, hi = min(vals), max(vals)
    return [0.5 if hi == lo else (v - lo) / (hi - lo) for v in vals]
