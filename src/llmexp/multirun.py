"""What ``python -m llmexp -m ...`` checks before Hydra starts its first job.

Hydra trains the jobs of a sweep one after another and composes each only when it starts, so
without these checks a bad value (``optim.lr=1e-3,-1``) failed after the jobs before it had
trained, a sweep over ``stage=`` or ``model=`` scattered its jobs over one directory per run
name (``multirun/sft-llama/<t>/0``, ``multirun/pretrain-llama/<t>/1``: compare saw one run), and
a sweep into a ``hydra.sweep.dir`` that held an earlier sweep's jobs mixed the two records.
"""

from __future__ import annotations

import time
from typing import List, Optional

from llmexp.errors import ConfigError, Problem

MULTIRUN_FLAGS = ("-m", "--multirun")


def is_multirun(argv: List[str]) -> bool:
    return any(a in MULTIRUN_FLAGS for a in argv)


def refuse_a_sweep_without_m(overrides: List[str]) -> None:
    """Several values without -m: Hydra's "Ambiguous value" with exit 1 (a traceback with
    LLMEXP_TRACEBACK); said as a sweep that needs -m."""
    swept = _swept(overrides)
    if swept:
        line = next(iter(swept))
        raise ConfigError([Problem(line.split("=", 1)[0], f"{line.split('=', 1)[1]} gives several values, which make a "
                                   "sweep: one run per value", "add -m (python -m llmexp -m ...), or give one value")])


def job_count(overrides: List[str]) -> int:
    """How many jobs Hydra's basic sweeper makes of ``overrides`` (the product of the swept values)."""
    count = 1
    for values in _swept(overrides).values():
        count *= len(values)
    return count


def _swept(overrides: List[str]) -> dict:
    """``{override text: [the override with each of its values]}`` for every swept override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from llmexp.overrides import sweep_values

    out = {}
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            key = o.get_key_element()
            out[o.input_line] = [f"{key}={v}" for v in sweep_values(o)]
    return out


def sweep_args(overrides: List[str], first_run_name: str) -> List[str]:
    """The arguments to add to a -m command line (one sweep directory for every job, when none is
    given), or ConfigError naming every bad value and every job directory that holds a run."""
    from llmexp.overrides import resolve_overrides

    swept = _swept(overrides)
    firsts = {line: values[0] for line, values in swept.items()}
    problems: List[Problem] = []
    names = {first_run_name}
    for line, values in swept.items():
        for value in values[1:]:  # each value once, the other swept keys at their first values
            job = [value if o == line else firsts.get(o, o) for o in overrides]
            try:
                cfg, _ = resolve_overrides(job)
            except ConfigError as e:
                problems.extend(e.problems)
                continue
            names.add(str(cfg.run_name))
    given = _given(overrides, "hydra.sweep.dir")
    subdir = _given(overrides, "hydra.sweep.subdir")
    if subdir is not None and job_count(overrides) > 1 and not any(
            k in subdir for k in ("${hydra.job.num}", "${hydra.job.id}", "${hydra.job.override_dirname}")):
        problems.append(Problem("hydra.sweep.subdir", f"{subdir!r} is the same directory for every job, so each job "
                                f"would write over the one before", "leave it unset (the job's number), or make it "
                                "name the job: ${hydra.job.num} or ${hydra.job.override_dirname}"))
    if given is not None and subdir in (None, "${hydra.job.num}"):
        problems.extend(_held_job_dirs(given, job_count(overrides)))
    if any(o.lstrip("+").split("=", 1)[0] == "resume" and o.split("=", 1)[1] not in ("null", "") for o in overrides):
        problems.append(Problem("resume", "resumes one run in its own directory, and -m starts new runs in a sweep "
                                "directory (the run resumed went into multirun/, and the killed one stayed "
                                "unfinished)", "drop -m to resume the run: python -m llmexp <its overrides> resume=..."))
    if problems:
        raise ConfigError(problems)
    if given is not None:
        return []
    name = first_run_name if len(names) == 1 else "sweep"
    return [f"hydra.sweep.dir=multirun/{name}/{time.strftime('%Y%m%d-%H%M%S')}"]


def _held_job_dirs(sweep_dir: str, jobs: int) -> List[Problem]:
    """The sweep directory's job directories (<dir>/<job number>) that already hold a run's record."""
    from llmexp.record import RunDir

    held = [f"{sweep_dir}/{job}" for job in range(jobs) if RunDir(f"{sweep_dir}/{job}").would_overwrite()]
    if not held:
        return []
    return [Problem("hydra.sweep.dir", f"{sweep_dir!r} already holds the runs of an earlier sweep in "
                    f"{', '.join(held)}, which this sweep's jobs would write over",
                    "choose a new hydra.sweep.dir, or leave it unset for a fresh timestamped one")]


def _given(overrides: List[str], key: str) -> Optional[str]:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")), None)
