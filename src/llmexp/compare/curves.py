"""The runs' curves overlaid, one panel per metric their metrics.csv holds (train and validation
loss, task score, reward, accuracy, KL, evals during training), each run named by what differs."""

from __future__ import annotations

from typing import Dict, List, Sequence

from llmexp.compare.losses import axis_label, base_name
from llmexp.plotting import pyplot
from llmexp.record import series

# Panels in this order when any run logged them; eval/<task>/<metric> curves follow.
PANELS = ("train/loss", "val/loss", "val/task_score", "val/accuracy", "val/reward", "train/reward", "train/kl")


def panel_metrics(columns: Sequence[str], most: int = 6) -> List[str]:
    """The metrics worth a panel: those a reader compares runs by, not diagnostics (lr,
    grad norm, perplexity, which is the loss again); a loss named by its kind (compare.losses) as
    the loss; an eval's ``samples``, a count, is not a curve."""
    present = sorted(set(columns))
    chosen = [c for m in PANELS for c in present if base_name(c) == m] + [
        c for c in present if c.startswith("eval/") and not c.endswith("/samples")]
    return chosen[:most]


def curves_figure(metrics: Sequence[List[Dict[str, float]]], labels: Sequence[str], title: str):
    """A Figure with one panel per metric and one line per run (None when no run logged any)."""
    columns = {k for rows in metrics for row in rows for k in row}
    names = panel_metrics(sorted(columns))
    if not names:
        return None
    plt = pyplot()
    ncols = 1 if len(names) == 1 else 2
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.9 * nrows + 0.8), dpi=100, squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, name in zip(axes.flat, names):
        for i, (rows, label) in enumerate(zip(metrics, labels)):
            pts = series(rows, name)
            if pts:
                style = "-" if name.startswith("train/") or len(pts) > 12 else "o-"
                ax.plot(*zip(*pts), style, color=colours(i % 10), linewidth=1.3, markersize=4, label=label)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(axis_label(name))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
