"""The sweep report's figures, each returned as a matplotlib Figure (tests inspect them; the
report saves them): the metric against every swept parameter, every trial's validation curve,
and parallel coordinates when three or more parameters were swept.

Constant parameters are left out everywhere: a panel where every trial has the same value says
nothing. Trials are named by their swept values (``lr=3e-4``), never by directory.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from llmexp.plotting import describe, is_number, log_scale, metric_unit, pyplot, short
from llmexp.record import RunDir, read_metrics, series
from llmexp.sweep.importance import swept

BEST, FAILED = dict(marker="*", s=260, color="gold", edgecolors="black", zorder=5), dict(marker="x", color="red", s=70)


def _failed(t) -> bool:
    return t.status != "finished" or t.metric is None


def _best(trials, goal: str):
    done = [t for t in trials if not _failed(t)]
    if not done:
        return None
    return (min if goal == "minimize" else max)(done, key=lambda t: t.metric)


def _positions(values: Sequence[Any]):
    """x positions and tick labels: numbers as they are, anything else as sorted categories."""
    if all(is_number(v) for v in values):
        return list(values), None
    cats = sorted({repr(v) for v in values})
    names = {repr(v): short(v) for v in values}
    return [cats.index(repr(v)) for v in values], [names[c] for c in cats]


def parameter_panels(trials, metric: str, goal: str, distributions: Optional[Dict[str, Any]] = None,
                     title: str = ""):
    """One panel per swept parameter: the metric against its value, the best trial starred,
    failed trials crossed at the panel's worse end (they have no metric to place them by)."""
    distributions = distributions or {}
    keys = swept([t.params for t in trials])
    if not keys or not any(not _failed(t) for t in trials):
        return None
    plt = pyplot()
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows + 0.6), dpi=100, squeeze=False)
    best = _best(trials, goal)
    for ax, key in zip(axes.flat, keys):
        values = [t.params.get(key) for t in trials]
        log = log_scale(values, distributions.get(key))
        xs, ticks = _positions(values)
        done = [(x, t) for x, t in zip(xs, trials) if not _failed(t)]
        pts = sorted((x, t.metric) for x, t in done)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="tab:blue", label="finished trial")
        for x, t in zip(xs, trials):
            if t is best:
                ax.scatter([x], [t.metric], label=f"best: trial {t.id}", **BEST)
        bad = [x for x, t in zip(xs, trials) if _failed(t)]
        if bad:  # at the panel's worse end (the top when minimizing): x in data coordinates, y in axes ones
            worse = 0.96 if goal == "minimize" else 0.04  # at the foot, a failed trial read as the best one
            ax.scatter(bad, [worse] * len(bad), transform=ax.get_xaxis_transform(), label="failed / stopped", **FAILED)
            # Their x is data, which autoscaling ignores under that transform: a trial that failed
            # beyond the finished ones' range (the diverged highest lr) fell outside the axis.
            ax.update_datalim([(x, done[0][1].metric) for x in bad], updatey=False)
            ax.autoscale_view()
        if log:
            ax.set_xscale("log")
            numbers = [v for v in values if is_number(v) and v > 0]
            if numbers and max(numbers) < 10 * min(numbers):
                # within a decade matplotlib labels every minor tick (1.2e-3, 1.3e-3, ...), which ran
                # into one smear: label the trials' own values instead
                from matplotlib.ticker import NullFormatter

                ax.xaxis.set_minor_formatter(NullFormatter())
                shown = sorted(set(numbers))
                ax.set_xticks(shown if len(shown) <= 6 else shown[:: math.ceil(len(shown) / 6)])
                ax.set_xticklabels([short(v) for v in ax.get_xticks()], rotation=30, ha="right")
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks)
        ax.set_xlabel(key + (" (log scale)" if log else ""))
        ax.set_ylabel(metric_unit(metric))
        ax.set_title(textwrap.fill(f"{metric} against {key}", width=40), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    legend = {}  # one legend for all panels, in the first: failed trials may show in another panel only
    for ax in axes.flat:
        legend.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels())})
    axes.flat[0].legend(list(legend.values()), list(legend), fontsize=8)
    # Wrapped to the figure's width (about 9 characters an inch): one panel is narrower than the title.
    fig.suptitle(textwrap.fill(title or f"{metric} ({goal}) for each swept parameter",
                               width=max(30, int(fig.get_figwidth() * 9))))
    fig.tight_layout()
    return fig


def _colour_by_metric(trials, plt):
    import matplotlib.colors as mcolors

    values = [t.metric for t in trials if not _failed(t)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi <= lo:  # one value (a tie): a bar around it, not 0..1e-9 drawn as "1e-10 + 1e-1"
        pad = max(abs(lo) * 0.05, 1e-3)
        lo, hi = lo - pad, hi + pad
    norm = mcolors.Normalize(vmin=lo, vmax=hi)
    return norm, plt.get_cmap("viridis")


def curve_metric(trials, metric: str) -> Optional[str]:
    """The curve to draw: the sweep metric when runs log it step by step (two points or more:
    an eval logged only after training is a dot per trial), else val/loss."""
    for key in (metric, "val/loss"):
        if any(len(series(read_metrics(RunDir(Path(t.run_dir)).metrics), key)) > 1 for t in trials):
            return key
    return None


def validation_curves(trials, metric: str, goal: str):
    """Every trial's validation curve against step, coloured by its final metric (colour bar),
    the best one thick and named, failed ones dashed grey."""
    key = curve_metric(trials, metric)
    if key is None:
        return None
    plt = pyplot()
    keys = swept([t.params for t in trials]) or sorted({k for t in trials for k in t.params})
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    norm, cmap = _colour_by_metric(trials, plt)
    best = _best(trials, goal)
    few = len(trials) <= 10
    for t in trials:
        pts = series(read_metrics(RunDir(Path(t.run_dir)).metrics), key)
        if not pts:
            continue
        name = describe(t.params, keys)
        if _failed(t):
            ax.plot(*zip(*pts), "--", color="grey", alpha=0.8, label=f"{name} ({t.status})" if few else None)
        else:
            ax.plot(*zip(*pts), "o-" if len(pts) < 12 else "-", color=cmap(norm(t.metric)),
                    linewidth=3.2 if t is best else 1.4, alpha=0.9,
                    label=(f"best: {name}" if t is best else name) if few or t is best else None)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label=f"final {metric}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric_unit(key))
    ax.set_title(f"{key} of every trial\n(colour: final {metric})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _axis_ticks(values: Sequence[Any], log: bool) -> List[tuple]:
    """(position in [0, 1], label) pairs for one parallel axis: every distinct value when there
    are few, else five evenly spaced (on the log scale where the axis is log)."""
    if not all(is_number(v) for v in values):
        cats = sorted({repr(v) for v in values})
        names = {repr(v): short(v) for v in values}
        return [(i / max(1, len(cats) - 1), names[c]) for i, c in enumerate(cats)]
    f = (lambda v: math.log10(v)) if log else float
    lo, hi = min(f(v) for v in values), max(f(v) for v in values)
    distinct = sorted({v for v in values})
    if len(distinct) <= 6:
        marks = [(f(v), v) for v in distinct]
    else:
        marks = [(lo + (hi - lo) * i / 4, None) for i in range(5)]
        marks = [(p, 10 ** p if log else p) for p, _ in marks]
    return [(0.5 if hi == lo else (p - lo) / (hi - lo), short(float(v))) for p, v in marks]


def _unit(values: Sequence[Any], log: bool) -> List[float]:
    if not all(is_number(v) for v in values):
        cats = sorted({repr(v) for v in values})
        return [cats.index(repr(v)) / max(1, len(cats) - 1) for v in values]
    vals = [math.log10(v) if log else float(v) for v in values]
    lo, hi = min(vals), max(vals)
    return [0.5 if hi == lo else (v - lo) / (hi - lo) for v in vals]


def parallel_coordinates(trials, metric: str, goal: str, distributions: Optional[Dict[str, Any]] = None):
    """Parallel coordinates of the swept parameters and the metric, with the values written on
    each axis; only worth drawing from three swept parameters on (fewer fit the panels)."""
    distributions = distributions or {}
    keys = swept([t.params for t in trials])
    done = [t for t in trials if not _failed(t)]
    if len(keys) < 3 or not done:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 2.1 * (len(keys) + 1)), 4.8), dpi=100)
    norm, cmap = _colour_by_metric(trials, plt)
    best = _best(trials, goal)
    columns = {}
    for k in keys:
        values = [t.params.get(k) for t in done]
        log = log_scale(values, distributions.get(k))
        columns[k] = (_unit(values, log), _axis_ticks(values, log))
    metric_values = [t.metric for t in done]
    columns[metric] = (_unit(metric_values, False), _axis_ticks(metric_values, False))
    axes = [*keys, metric]
    for i, t in enumerate(done):
        ax.plot(range(len(axes)), [columns[k][0][i] for k in axes], color=cmap(norm(t.metric)),
                linewidth=3.2 if t is best else 1.2, alpha=0.9, zorder=3 if t is best else 2)
    for j, k in enumerate(axes):
        ax.axvline(j, color="black", linewidth=0.8, zorder=1)
        for pos, text in columns[k][1]:
            ax.text(j + 0.03, pos, text, fontsize=8, va="center", ha="left",
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.7), zorder=4)
    ax.set_xticks(range(len(axes)), axes)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(axes) - 0.5)
    ax.set_ylim(-0.08, 1.08)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
    ax.set_title(f"{len(keys)} swept parameters and {metric}: one line per trial"
                 + (f", thick: best (trial {best.id})" if best else ""))
    fig.tight_layout()
    return fig
