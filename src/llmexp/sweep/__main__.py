"""``python -m llmexp.sweep FILE`` (or ``llmexp sweep FILE``): run a W&B sweep file offline.

    llmexp sweep sweeps/lr.yaml --count 6 --parallel 2 [--dir runs/sweeps/lr] [trainer.max_steps=200 ...]

Online instead: ``wandb sweep sweeps/lr.yaml`` then ``wandb agent <entity/project/id>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

from llmexp.argtypes import command_summary
from llmexp.argtypes import positive_int
from llmexp.errors import UserError, report


def threads_note(parallel: int, environ: Optional[Dict[str, str]] = None, cpus: Optional[int] = None) -> str:
    """What each of the trials running at once gets of the CPUs (SweepEngine.trial_environment),
    and a warning where there are more trials than CPUs."""
    import os

    from llmexp.sweep.engine import trial_environment, usable_cpus

    environ = dict(os.environ) if environ is None else environ
    cpus = usable_cpus() if cpus is None else cpus
    threads = trial_environment(parallel, environ, cpus)["OMP_NUM_THREADS"]
    note = (f"llmexp sweep: {parallel} trials at once on {cpus} CPU{'s' * (cpus != 1)}, {threads} CPU "
            f"thread{'s' * (threads != '1')} each (OMP_NUM_THREADS{' as set' if environ.get('OMP_NUM_THREADS') else ''})")
    if parallel > cpus:
        note += (f"; more trials than CPUs take turns on them: the sweep ends no sooner than with --parallel {cpus} "
                 "and holds more in memory")
    return note


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="llmexp sweep", description=command_summary(__doc__))
    ap.add_argument("spec", help="a W&B sweep YAML (method, metric, parameters)")
    ap.add_argument("overrides", nargs="*", help="llmexp overrides for every trial (key=value), after the "
                                                 "spec's command: trainer.max_steps=200 model=gpt2")
    ap.add_argument("--count", type=positive_int, default=None,
                    help="trials in all (default: grid until exhausted, else 10)")
    ap.add_argument("--parallel", type=positive_int, default=1, help="trials running at once")
    ap.add_argument("--dir", default=None, help="sweep directory (default runs/sweeps/<name>); rerun to resume")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the options
    try:
        from llmexp.sweep.engine import SweepEngine
        from llmexp.sweep.report import tie_note, write_report
        from llmexp.sweep.spec import check_spec, load_spec

        spec = load_spec(args.spec, args.overrides)
        check_spec(spec)
        count = args.count if args.count is not None else (None if spec.config.get("method") == "grid" else 10)
        out = Path(args.dir or Path("runs") / "sweeps" / spec.name)
        engine = SweepEngine(spec, out, count, args.parallel)
        if args.parallel > 1:
            print(threads_note(args.parallel), flush=True)
        import signal

        def stop_as_on_ctrl_c(signum, frame):  # timeout, Slurm and systemd send SIGTERM: the trial was orphaned
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop_as_on_ctrl_c)
        try:
            trials = engine.run()
        except KeyboardInterrupt:
            running = sorted(engine.procs)
            engine.interrupt_trials()
            sys.stderr.write(f"llmexp sweep: interrupted; {out}/trials.json keeps every trial's state"
                             + (f" ({'; '.join(engine.where_trials_stand(running))})" if running else "")
                             + ": run the same command again to resume the sweep\n")
            return 130
        result = write_report(out, trials, spec.metric, spec.goal, spec.name, spec.parameters)
    except UserError as e:
        return report(e)
    best = result["best"]
    print(f"sweep {spec.name}: {len(trials)} trials, report in {out}/report.md")
    if best is not None:
        print(f"best trial {best.id}: {spec.metric}={best.metric:.6g} {best.params}{tie_note(best, trials)}")
        return 0
    sys.stderr.write(f"llmexp sweep: no trial finished with a value of {spec.metric}; each trial's log is "
                     f"{out}/trial-NNN.log\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
