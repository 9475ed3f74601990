"""Sweeps with trials side by side: `llmexp sweep sweeps/lr.yaml` one trial at a time, `--parallel K`
as shipped (the CPU threads shared out among the trials), and `--parallel K` with every trial on
every CPU (before: each torch process starts a thread per CPU). Wall time of the whole sweep,
fitting time per trial, and the ratios to one trial at a time, measured in the same run.

    python benchmarks/sweep_parallel.py [--parallel 2] [--spec sweeps/lr.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, save


def sweep(spec: str, parallel: int, threads: str | None) -> dict:
    out = Path(tempfile.mkdtemp(prefix="llmexp-sweep-bench-")) / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmexp.sweep", spec, "--dir", str(out), "--parallel", str(parallel)],
                   check=True, capture_output=True, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("trial-*/summary.json"))]
    return {"sweep_seconds": wall, "trials": len(summaries),
            "fit_seconds_per_trial": statistics.median(s["fit_seconds"] for s in summaries),
            "cpu_threads_per_trial": summaries[0]["cpu_threads"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--spec", default="sweeps/lr.yaml")
    args = ap.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = {"one at a time": sweep(args.spec, 1, None),
            f"--parallel {args.parallel} (shipped: threads shared out)": sweep(args.spec, args.parallel, None),
            f"--parallel {args.parallel}, every trial on all {cpus} CPUs (before)": sweep(args.spec, args.parallel,
                                                                                       str(cpus))}
    base = rows["one at a time"]["sweep_seconds"]
    for name, row in rows.items():
        row["speedup_over_one_at_a_time"] = base / row["sweep_seconds"]
        print(f"{name:52s} sweep {row['sweep_seconds']:5.1f}s  fit/trial {row['fit_seconds_per_trial']:4.1f}s  "
              f"threads/trial {row['cpu_threads_per_trial']}  x{row['speedup_over_one_at_a_time']:.2f}")
    save("sweep_parallel", {"settings": {**vars(args), "cpus": cpus}, "rows": rows})


if __name__ == "__main__":
    main()
