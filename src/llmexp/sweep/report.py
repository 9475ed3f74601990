"""The sweep report: a table of trials (CSV and Markdown), parameter importance, figures (see
llmexp.sweep.plots) and the best trial."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Optional

from llmexp.record import write_atomic


def best_trial(trials, goal: str):
    done = [t for t in trials if t.status == "finished" and t.metric is not None]
    if not done:
        return None
    return min(done, key=lambda t: t.metric) if goal == "minimize" else max(done, key=lambda t: t.metric)


def tied_with(best, trials) -> List[Any]:
    """The other finished trials with exactly the best trial's value: a tie the metric cannot
    break (an exact match on 40 questions, 4 of 40 for both, was reported as one clear best)."""
    if best is None:
        return []
    return [t for t in trials if t is not best and t.status == "finished" and t.metric == best.metric]


def tie_note(best, trials) -> str:
    tied = tied_with(best, trials)
    if not tied:
        return ""
    return (f" (tied with trial{'s' if len(tied) > 1 else ''} {', '.join(str(t.id) for t in tied)}: the metric does "
            f"not tell them apart; more eval examples or another metric would)")


def rows(trials, metric: str) -> List[Dict[str, Any]]:
    keys = sorted({k for t in trials for k in t.params})
    return [{"trial": t.id, **{k: t.params.get(k) for k in keys}, metric: t.metric, "status": t.status,
             "seconds": round(t.seconds, 1), "run_dir": t.run_dir} for t in trials]


def write_report(out_dir: Path, trials, metric: str, goal: str, sweep_name: str,
                 parameters: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """report.csv, report.md (trials, parameter importance, best trial, figures) and the figures:
    report.png (metric against each swept parameter), curves.png (every trial's validation curve),
    parallel.png (three or more swept parameters). ``parameters`` is the spec's, for which
    distributions are log-uniform."""
    out_dir = Path(out_dir)
    table = rows(trials, metric)
    best = best_trial(trials, goal)
    buf = io.StringIO()
    if table:
        writer = csv.DictWriter(buf, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    write_atomic(out_dir / "report.csv", buf.getvalue())
    distributions = {k: v.get("distribution") for k, v in (parameters or {}).items() if isinstance(v, dict)}
    figures = write_figures(out_dir, trials, metric, goal, sweep_name, distributions)
    lines = [f"# Sweep {sweep_name}", "", f"Metric: `{metric}` ({goal}). Trials: {len(trials)}.", ""]
    if table:
        cols = list(table[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in table]
    lines += ["", f"**Best trial:** {best.id} ({metric} = {best.metric:.6g}) with "
              f"{', '.join(f'{k}={v}' for k, v in best.params.items())}, run directory `{best.run_dir}`"
              + tie_note(best, trials) if best else "**Best trial:** none finished"]
    lines += ["", *importance_lines(trials, metric, distributions)]
    captions = {"report.png": f"{metric} against each swept parameter (best starred, failed crossed)",
                "curves.png": "validation curve of every trial, coloured by its final metric",
                "parallel.png": "parallel coordinates of the swept parameters"}
    lines += [f"![{captions[name]}]({name})" + "\n" for name in figures]
    write_atomic(out_dir / "report.md", "\n".join(lines) + "\n")
    return {"best": best, "plot": "report.png" in figures, "figures": figures}


def write_figures(out_dir: Path, trials, metric: str, goal: str, sweep_name: str,
                  distributions: Dict[str, Any]) -> List[str]:
    """Save the figures there is something to show in; return their file names."""
    from llmexp.plotting import save
    from llmexp.sweep.plots import parallel_coordinates, parameter_panels, validation_curves

    title = f"Sweep {sweep_name}: {metric} ({goal}), {len(trials)} trials"
    made = {"report.png": parameter_panels(trials, metric, goal, distributions, title=title),
            "curves.png": validation_curves(trials, metric, goal),
            "parallel.png": parallel_coordinates(trials, metric, goal, distributions)}
    for name, fig in made.items():
        if fig is not None:
            save(fig, out_dir / name)
    return [name for name, fig in made.items() if fig is not None]


def importance_lines(trials, metric: str, distributions: Dict[str, Any]) -> List[str]:
    """The parameter-importance table of report.md (as W&B shows it)."""
    from llmexp.sweep.importance import importance

    done = [t for t in trials if t.status == "finished" and t.metric is not None]
    found = importance([t.params for t in done], [t.metric for t in done], distributions)
    if not found:
        return ["## Parameter importance", "", "Needs at least two finished trials and a parameter that varies.", ""]
    lines = ["## Parameter importance", "",
             f"Importance: share of a random forest's (scikit-learn, 100 trees) fit of `{metric}` to the swept "
             f"parameters (log10 of log-scaled ones); correlation: Pearson's r of `{metric}` with the value "
             f"(positive: {metric} rises with it). {len(done)} finished trials"
             + (" — too few for the forest." if len(done) < 3 else "."), "",
             "| parameter | importance | correlation |", "|---|---|---|"]
    lines += [f"| {r['param']} | {_cell(r['importance'])} | {_cell(r['correlation'])} |" for r in found]
    return lines + [""]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)
