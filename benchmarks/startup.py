"""Start-up: `python -m llmexp --help`, and the time from the command to the first optimizer step
of the default run (read from the run's summary.json, measured from process start).

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, save


def time_help() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmexp", "--help"], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - start


def time_to_first_step() -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="llmexp-startup-")) / "run"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmexp", f"hydra.run.dir={run_dir}"], check=True,
                   capture_output=True, cwd=REPO)
    total = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"first_step": summary["seconds_to_first_step"], "whole_default_run": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    helps = [time_help() for _ in range(args.repeats)]
    runs = [time_to_first_step() for _ in range(max(1, args.repeats // 2))]
    result = {
        "help_seconds": {"median": statistics.median(helps), "all": helps, "target": 2.0},
        "first_step_seconds": {"median": statistics.median(r["first_step"] for r in runs),
                               "all": [r["first_step"] for r in runs], "target": 15.0},
        "default_run_seconds": {"median": statistics.median(r["whole_default_run"] for r in runs),
                                "target": 180.0},
    }
    for key, value in result.items():
        print(f"{key:22s} median {value['median']:.2f}s (target <= {value['target']:.0f}s)")
    save("startup", {"settings": vars(args), **result})


if __name__ == "__main__":
    main()
