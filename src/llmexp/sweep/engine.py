"""Run a sweep locally: propose trials with the `sweeps` engine, run each as a normal llmexp run.

State lives in ``<dir>/trials.json`` (rewritten atomically after every change), so an interrupted
sweep resumes: finished trials are kept, trials that were running continue from their last
checkpoint (``resume=auto`` in their own run directory), and new proposals take earlier results
into account (bayes) or skip what was done (grid).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from llmexp.errors import UserError
from llmexp.record import RunDir, write_atomic
from llmexp.sweep.results import history, metric_names, recorded_value, trial_metric
from llmexp.sweep.spec import SweepSpec

FINISHED, FAILED, STOPPED, RUNNING, INTERRUPTED = "finished", "failed", "stopped", "running", "interrupted"


@dataclass
class Trial:
    id: int
    params: Dict[str, Any]
    run_dir: str
    status: str = RUNNING
    metric: Optional[float] = None
    seconds: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> List[str]:
        return [f"{k}={_format(v)}" for k, v in self.params.items()]


def _format(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format(v) for v in value) + "]"
    return str(value)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a batch scheduler narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def trial_environment(parallel: int, environ: Dict[str, str], cpus: int) -> Dict[str, str]:
    """A trial's environment: the sweep's, with the CPU threads shared out among the trials that
    run at once, unless OMP_NUM_THREADS is set. Each torch process otherwise starts a thread per
    CPU: with --parallel 2 on 2 CPUs each trial fitted in 13-15 s instead of 2.6-3.0 s alone, and
    the sweep took as long as one trial at a time (53 s against 51 s; one thread each: 27 s)."""
    env = dict(environ)
    if parallel > 1 and not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, cpus // parallel))
    return env


class SweepEngine:
    def __init__(self, spec: SweepSpec, out_dir: Path, count: Optional[int], parallel: int = 1,
                 poll_seconds: float = 1.0):
        self.spec, self.dir, self.count, self.parallel, self.poll = spec, Path(out_dir), count, parallel, poll_seconds
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(f"--dir {self.dir} is a file, not a directory; choose another --dir")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trials: List[Trial] = self._load()
        self.procs: Dict[int, subprocess.Popen] = {}
        self.started: Dict[int, float] = {}

    # -- state -------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.dir / "trials.json"

    def _load(self) -> List[Trial]:
        if not self.state_file.is_file():
            if RunDir(self.dir).held():
                raise UserError(f"--dir {self.dir} holds a run, not a sweep; choose another --dir")
            return []
        state = json.loads(self.state_file.read_text())
        other = ((state["config"], state.get("overrides", [])) != (self.spec.config, self.spec.extra) if "config" in state
                 else state.get("sweep") not in (None, self.spec.name))
        if other and state.get("spec") == str(self.spec.path) and "config" in state:
            old, new = state["config"], self.spec.config
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            what = ["the spec"] if changed else []
            if state.get("overrides", []) != self.spec.extra:
                what.append("the command-line overrides")
                changed.append(f"command-line overrides {' '.join(state.get('overrides', [])) or '(none)'} -> "
                               f"{' '.join(self.spec.extra) or '(none)'}")
            finished = [t for t in state.get("trials", []) if t.get("status") == "finished"]
            raise UserError(f"--dir {self.dir} holds sweep {self.spec.name!r} as {state.get('spec')} was when it "
                            f"started; {' and '.join(what)} {'has' if what == ['the spec'] else 'have'} changed since "
                            f"({', '.join(changed)}), and a sweep resumes only with the spec and overrides it started "
                            f"with: undo the change to resume it, or give the changed sweep another --dir"
                            + ("" if finished else f" (none of its trials finished: removing {self.dir} starts it "
                                                   f"over there)"))
        was, now = state.get("environment", {}), self.spec.environment()
        changed_env = [k for k in sorted(set(was) & set(now)) if was[k] != now[k]]
        if not other and changed_env:
            raise UserError(f"--dir {self.dir} holds sweep {self.spec.name!r}, whose overrides read "
                            + ", ".join(f"{k}={was[k]!r} when it started and {k}={now[k]!r} now" for k in changed_env)
                            + "; a sweep resumes with the values its trials ran with: set "
                            + " ".join(f"{k}={was[k]}" for k in changed_env) + " to resume it, or give the sweep "
                            "with the new values another --dir")
        if other:
            raise UserError(f"--dir {self.dir} holds another sweep ({state.get('sweep')!r} from {state.get('spec')}); "
                            f"a sweep resumes only in its own directory: choose another --dir")
        trials = [Trial(**t) for t in state["trials"]]
        for t in trials:
            if t.status == RUNNING:  # the sweep was interrupted while this trial ran
                t.status = INTERRUPTED
                if RunDir(t.run_dir).summary() is not None:  # ... and the trial ran on to its end
                    t.metric = trial_metric(Path(t.run_dir), self.spec.metric)
                    t.status = FINISHED if t.metric is not None else FAILED
        return trials

    def _save(self) -> None:
        payload = {"sweep": self.spec.name, "spec": str(self.spec.path), "metric": self.spec.metric,
                   "goal": self.spec.goal, "config": self.spec.config, "overrides": self.spec.extra,
                   "environment": self.spec.environment(),
                   "trials": [asdict(t) for t in self.trials]}
        write_atomic(self.state_file, json.dumps(payload, indent=2) + "\n")

    # -- proposing -------------------------------------------------------------------------------
    def _sweep_runs(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sweeps import RunState, SweepRun

        states = {FINISHED: RunState.finished, FAILED: RunState.failed, STOPPED: RunState.killed,
                  RUNNING: RunState.running, INTERRUPTED: RunState.running}
        runs = []
        for t in self.trials:
            summary = {self.spec.metric: t.metric} if t.metric is not None else {}
            runs.append(SweepRun(name=f"trial-{t.id}", state=states[t.status], config={k: {"value": v} for k, v in t.params.items()},
                                 summaryMetrics=summary, sampledHistory=history(Path(t.run_dir), self.spec.metric)))
        return runs

    def _propose(self) -> Optional[Dict[str, Any]]:
        import sweeps

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = sweeps.next_run(self.spec.config, self._sweep_runs())
        if run is None:
            return None
        return {k: _plain(v["value"]) for k, v in run.config.items()}

    # -- running ---------------------------------------------------------------------------------
    def _launch(self, trial: Trial) -> None:
        log_file = Path(trial.run_dir).with_suffix(".log")
        log = open(log_file, "a")
        # the trial's progress lines go to its log (a line every tenth of the run: tail -f it)
        cmd = [sys.executable, "-m", "llmexp", *self.spec.fixed_overrides(), *trial.overrides(),
               f"hydra.run.dir={trial.run_dir}", "resume=auto"]
        # Its own session: Ctrl+C reaches the sweep alone, which passes it on once (interrupt_trials); a
        # trial that got the terminal's and the sweep's broke its message off with a traceback.
        env = trial_environment(self.parallel, dict(os.environ), usable_cpus())
        self.procs[trial.id] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True)
        self.started[trial.id] = time.time()
        resumed = trial.status == INTERRUPTED
        trial.status = RUNNING
        self._save()
        print(f"trial {trial.id} {'resumed' if resumed else 'started'}: {trial.params} (its log: {log_file})",
              flush=True)

    def _next_trial(self) -> Optional[Trial]:
        for t in self.trials:
            if t.status == INTERRUPTED and t.id not in self.procs:
                return t
        if self.count is not None and len(self.trials) >= self.count:
            return None
        params = self._propose()
        if params is None:
            return None
        trial = Trial(id=len(self.trials), params=params, run_dir=str(self.dir / f"trial-{len(self.trials):03d}"))
        self.trials.append(trial)
        return trial

    def _reap(self) -> None:
        for tid, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            trial = self.trials[tid]
            trial.seconds += time.time() - self.started.pop(tid)
            del self.procs[tid]
            if trial.status == STOPPED:
                continue
            trial.metric = trial_metric(Path(trial.run_dir), self.spec.metric)
            trial.status = FINISHED if proc.returncode == 0 and trial.metric is not None else FAILED
            trial.extra["exit_code"] = proc.returncode
            self._save()
            if trial.status == FINISHED:
                print(f"trial {tid} finished: {self.spec.metric}={trial.metric:.6g} {trial.params}", flush=True)
                continue
            summary = RunDir(trial.run_dir).summary() if proc.returncode == 0 else None
            if summary is not None and recorded_value(summary, self.spec.metric) is None:
                raise UserError(f"metric.name: the sweep's metric {self.spec.metric!r} is not one a run records, "
                                f"so no trial can be ranked (trial {tid} finished and recorded "
                                f"{', '.join(metric_names(summary))}); fix metric.name in {self.spec.path}")
            why = f"exit code {proc.returncode}" if proc.returncode else f"{self.spec.metric} is not a finite number"
            print(f"trial {tid} failed ({why}; its log: {Path(trial.run_dir).with_suffix('.log')}) {trial.params}",
                  flush=True)

    def _early_terminate(self) -> None:
        if "early_terminate" not in self.spec.config or not self.procs:
            return
        import sweeps

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stop = sweeps.stop_runs(self.spec.config, self._sweep_runs())
        for run in stop:
            tid = int(run.name.split("-")[1])
            if tid in self.procs and self.trials[tid].status == RUNNING:
                self.trials[tid].status = STOPPED
                self.procs[tid].terminate()
                self._save()
                print(f"trial {tid} stopped early by {self.spec.config['early_terminate'].get('type')}", flush=True)

    def interrupt_trials(self, wait_seconds: float = 120) -> None:
        """Ctrl+C reached the sweep (its trials run in sessions of their own): stop every running
        trial as Ctrl+C stops a run (when its step ends, with a checkpoint of it), so that a rerun
        resumes it rather than finding it still running. Ctrl+C again is passed on as well: the
        trials stop at once, from their last checkpoints."""
        import signal

        def interrupt() -> None:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)

        interrupt()
        deadline = time.time() + wait_seconds
        for proc in self.procs.values():
            while True:
                try:
                    proc.wait(timeout=max(deadline - time.time(), 1))
                    break
                except KeyboardInterrupt:
                    interrupt()
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    break

    def where_trials_stand(self, ids: List[int]) -> List[str]:
        """What a rerun does with each of these interrupted trials: continue from its last
        checkpoint, or start over (it had written none)."""
        resumable = [i for i in ids if RunDir(self.trials[i].run_dir).checkpoint_to_resume() is not None]
        fresh = [i for i in ids if i not in resumable]
        name = lambda group: f"trial{'s' if len(group) > 1 else ''} {', '.join(map(str, group))}"  # noqa: E731
        return ([f"{name(resumable)} will continue from {'their' if len(resumable) > 1 else 'its'} last checkpoint"]
                if resumable else []) + ([f"{name(fresh)} will start over (no checkpoint yet)"] if fresh else [])

    def run(self) -> List[Trial]:
        """Every trial to the end; a sweep whose metric no run records stops at its first finished
        trial (UserError), its other trials stopped as Ctrl+C stops them."""
        try:
            return self._run()
        except UserError:
            self.interrupt_trials()
            raise

    def _run(self) -> List[Trial]:
        while True:
            while len(self.procs) < self.parallel:
                trial = self._next_trial()
                if trial is None:
                    break
                self._launch(trial)
            if not self.procs:
                break
            time.sleep(self.poll)
            self._reap()
            self._early_terminate()
        return self.trials
