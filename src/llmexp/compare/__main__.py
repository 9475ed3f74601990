"""``llmexp compare RUN_DIR... | GLOB`` (or ``python -m llmexp.compare``): finished runs side by side.

    llmexp compare runs/sweeps/lr                     # every trial of a sweep
    llmexp compare runs/pipelines/dpo/<time>          # every stage of a pipeline
    llmexp compare 'runs/sft-llama/*' runs/dpo-llama/2026-01-02_10-00-00 --out reports/sft-vs-dpo

Prints a table (stage, model, data, the config keys that differ, initial -> final metrics, eval
results, wall time, tokens/s) and writes compare.md, compare.csv and curves.png to --out
(default runs/compare/<time>, a new directory: never a run's own), and answers.md: what each
run's model answered to the held-out prompts its runs recorded (answers.jsonl).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from llmexp.argtypes import command_summary
from llmexp.errors import UserError, quiet_exits, report
from llmexp.record import RunDir, write_atomic


# What a comparison writes (answers.md and curves.png only when there is something to show).
REPORT_FILES = ("compare.md", "compare.csv", "curves.png", "answers.md")


def output_dir(out: Optional[str], runs: List[Path]) -> Path:
    """--out, or a fresh runs/compare/<time>; a run or sweep directory, a directory inside one (a
    run's model/), or one of the compared runs is refused: a comparison never writes into a run's files."""
    path = Path(out) if out else fresh_dir(Path("runs") / "compare" / time.strftime("%Y%m%d-%H%M%S"))
    inside = [p for p in [path.resolve(), *path.resolve().parents] if RunDir(p).held() or (p / "trials.json").exists()]
    if inside or path.resolve() in {r.resolve() for r in runs}:
        raise UserError(f"compare: --out {path} holds a run or a sweep; choose a new directory for the comparison "
                        f"(default: runs/compare/<time>)")
    if path.exists() and not path.is_dir():
        raise UserError(f"compare: --out {path} is a file; choose a directory")
    earlier = [name for name in REPORT_FILES if (path / name).exists()]
    if earlier:  # written over, an earlier report lost its files, or kept a stale one next to new ones
        raise UserError(f"compare: --out {path} holds an earlier comparison ({', '.join(earlier)}); choose a new "
                        f"directory, or delete that one to make it again")
    return path


def fresh_dir(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ... : a directory this call created, so that two
    comparisons started within the same second do not write into one."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"compare: no free directory next to {base}; give --out")


def compare(paths: List[str], out: Optional[str] = None, show: bool = True) -> Dict[str, Any]:
    """Load the runs, write the table and curves to the output directory; return what was made."""
    from llmexp.compare.answers import answers_markdown
    from llmexp.compare.curves import curves_figure
    from llmexp.compare.diff import differing_keys, run_labels
    from llmexp.compare.losses import loss_names, renamed
    from llmexp.compare.runs import load_run, run_paths
    from llmexp.compare.table import print_table, records, to_csv, to_markdown
    from llmexp.plotting import save

    found = run_paths(paths)
    runs = [load_run(p) for p in found]  # a damaged record is refused before anything is written
    out_dir = output_dir(out, found)
    keys = differing_keys([r.config for r in runs])
    labels = run_labels([r.config for r in runs], keys, found)
    title = f"{len(runs)} run{'s' if len(runs) != 1 else ''}" + (f", differing in {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}" if keys else "")
    rows = records(runs, keys, labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "compare.csv", to_csv(rows))
    markdown = to_markdown(rows, title)
    names = loss_names([r.summary.get("stage") or "" for r in runs])
    fig = curves_figure([[renamed(row, n) for row in r.metrics] for r, n in zip(runs, names)], labels, title)
    if fig is not None:
        save(fig, out_dir / "curves.png")
        markdown += "\n![curves of every run](curves.png)\n"
    said = answers_markdown(runs, labels)
    if said is not None:
        write_atomic(out_dir / "answers.md", said[0])
        markdown += (f"\nWhat each model answered: [answers.md](answers.md) ({said[1]} of the {said[2]} prompts "
                     f"every run was asked differently).\n")
    write_atomic(out_dir / "compare.md", markdown)
    if show:
        print_table(rows, title)
    return {"dir": out_dir, "keys": keys, "labels": labels, "rows": rows, "curves": fig is not None,
            "answers": said[1:] if said is not None else None}


@quiet_exits
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="llmexp compare", description=command_summary(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("runs", nargs="+", help="run directories, sweep or pipeline directories, or quoted globs")
    ap.add_argument("--out", default=None, help="where to write compare.md, compare.csv, curves.png "
                                                "(default runs/compare/<time>)")
    args = ap.parse_args(argv)
    try:
        result = compare(args.runs, args.out)
    except UserError as e:
        return report(e)
    made = ", ".join(["compare.md", "compare.csv"] + (["curves.png"] if result["curves"] else [])
                     + (["answers.md"] if result["answers"] else []))
    n = len(result["rows"])
    print(f"comparison of {n} run{'s' if n != 1 else ''} in {result['dir']}/ ({made})")
    if result["answers"]:
        differ, prompts = result["answers"]
        print(f"their models answered {differ} of {prompts} recorded prompts differently (answers.md)" if prompts
              else "no recorded prompt was asked of every run; answers.md lists what each model answered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
