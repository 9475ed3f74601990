"""The comparison table: one row per run (what it was, what differs, initial -> final metrics,
task metrics, time and speed), as CSV (numbers, for a spreadsheet), Markdown and a rich table."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from llmexp.compare.diff import flatten
from llmexp.compare.losses import loss_names, renamed
from llmexp.compare.runs import Run
from llmexp.plotting import short

# The metrics a reader looks for first; the rest follow in name order.
FIRST = ("val/task_score", "val/loss", "val/accuracy", "val/reward")
# Group choices every row already shows as its stage, model and data columns.
SHOWN = ("stage.name", "model.name", "data.name")


def metric_pairs(summary: Dict[str, Any]) -> Dict[str, Tuple[Optional[float], Optional[float]]]:
    """name -> (initial, final): validation metrics, then eval results as ``eval/<task>/<metric>``."""
    initial, final = summary.get("initial") or {}, summary.get("final") or {}
    names = sorted(set(initial) | set(final), key=lambda k: (k not in FIRST, FIRST.index(k) if k in FIRST else 0, k))
    pairs = {k: (initial.get(k), final.get(k)) for k in names}
    before, after = summary.get("eval_initial") or {}, summary.get("eval") or {}
    for task in sorted(set(before) | set(after)):
        for metric in sorted(set(before.get(task) or {}) | set(after.get(task) or {})):
            pairs[f"eval/{task}/{metric}"] = ((before.get(task) or {}).get(metric), (after.get(task) or {}).get(metric))
    return {**pairs, **compression_pairs(summary)}


def compression_pairs(summary: Dict[str, Any]) -> Dict[str, Tuple[Optional[float], Optional[float]]]:
    """A compression stage's model compressed -> its export (llmexp.stages.compression), so that
    size, sparsity and speed stand next to the task metric they cost."""
    c = summary.get("compression")
    if not c:
        return {}
    speed = c.get("generation_tokens_per_second") or {}
    return {**{f"compression/{name}": (c.get(f"{name}_before"), c.get(f"{name}_after"))
               for name in ("weight_bytes", "parameters", "zero_fraction")},
            "compression/generation_tokens_per_second": (speed.get("before"), speed.get("after"))}


def records(runs: Sequence[Run], keys: Sequence[str], labels: Sequence[str]) -> List[Dict[str, Any]]:
    """One flat row per run with the same columns in every row (CSV needs that); losses of
    different kinds in columns of their own (compare.losses)."""
    names = loss_names([r.summary.get("stage") or "" for r in runs])
    pairs = [renamed(metric_pairs(r.summary), n) for r, n in zip(runs, names)]
    metrics: List[str] = []
    for p in pairs:
        metrics += [m for m in p if m not in metrics]
    # trainer.keep_best: the model (and the final metrics) of a run can be an earlier step's than its last
    kept_best = any((r.summary.get("best") or {}).get("exported") for r in runs)
    out = []
    for run, label, p in zip(runs, labels, pairs):
        s, flat = run.summary, flatten(run.config)
        row: Dict[str, Any] = {"run": label, "stage": s.get("stage"), "model": s.get("model"), "data": s.get("data")}
        row.update({k: flat.get(k) for k in keys if k not in SHOWN})
        row["steps"] = s.get("global_step")
        if kept_best:
            best = s.get("best") or {}
            row["model_step"] = best["step"] if best.get("exported") else s.get("global_step")
        for m in metrics:
            row[f"{m} initial"], row[f"{m} final"] = p.get(m, (None, None))
        row.update({"wall_seconds": s.get("wall_seconds"), "tokens_per_second": s.get("tokens_per_second"),
                    "run_dir": str(run.path)})
        out.append(row)
    return out


def display(rows: Sequence[Dict[str, Any]], arrows_in_header: bool = True) -> Tuple[List[str], List[List[str]]]:
    """Header and cells for people: ``initial → final`` in one column, numbers shortened."""
    if not rows:
        return [], []
    cols = [c for c in rows[0] if not c.endswith(" final")]
    header = [c[: -len(" initial")] + (" (initial → final)" if arrows_in_header else "") if c.endswith(" initial")
              else c for c in cols]
    cells = []
    for row in rows:
        line = []
        for col in cols:
            value = row[col]
            if col.endswith(" initial"):
                line.append(f"{_num(value)} → {_num(row[col[: -len(' initial')] + ' final'])}")
            elif value is None:
                line.append("–")
            elif col == "wall_seconds":
                line.append(f"{value:.1f} s")
            elif col == "tokens_per_second":
                line.append(f"{value:.0f}")
            elif col == "run_dir":  # whole: "…/20261206-190553/0" did not say which run a row was
                line.append(str(value))
            else:
                line.append(short(value))
        cells.append(line)
    return header, cells


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"  # 15570, not 1.557e+04
    return short(value)


def to_csv(rows: Sequence[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def to_markdown(rows: Sequence[Dict[str, Any]], title: str) -> str:
    header, cells = display(rows)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
    return "\n".join(lines) + "\n"


def print_table(rows: Sequence[Dict[str, Any]], title: str) -> None:
    """The table on the console, narrowed to fit: columns equal in every run go into the caption,
    run directories stay in the files. When the runs' columns still do not fit the console (many
    differing keys and metrics), it is turned: a row per column, a column per run."""
    from rich.console import Console
    from rich.table import Table

    header, cells = display(rows, arrows_in_header=False)
    result = {j for j, h in enumerate(header) if h in ("run", "wall_seconds", "tokens_per_second")
              or " → " in cells[0][j]}
    keep = [j for j, h in enumerate(header) if j in result or (h != "run_dir" and (len(cells) == 1 or
            len({line[j] for line in cells}) > 1))]
    same = [f"{header[j]}={cells[0][j]}" for j in range(len(header)) if j not in keep and header[j] != "run_dir"]
    caption = f"same in every run: {', '.join(same)}" if same else None
    console = Console()
    if fits(header, cells, keep, console.width):
        table = Table(title=title + " (metrics: initial → final)", caption=caption)
        for j in keep:
            table.add_column(header[j], overflow="fold")
        for line in cells:
            table.add_row(*[line[j] for j in keep])
    else:
        names = [Path(row["run_dir"]).name for row in rows]
        table = Table(title=title + " (metrics: initial → final)", caption=caption)
        table.add_column("", style="bold", overflow="fold")
        for name in names:
            table.add_column(name, overflow="fold")
        for j in keep:
            table.add_row(header[j], *[line[j] for line in cells])
    console.print(table)


def fits(header: Sequence[str], cells: Sequence[Sequence[str]], keep: Sequence[int], width: int) -> bool:
    """Whether one row per run fits ``width`` columns without folding a header or a cell into
    pieces shorter than about ten characters."""
    needed = sum(min(max(len(header[j]), *(len(line[j]) for line in cells)), 10) + 3 for j in keep) + 1
    return needed <= width
