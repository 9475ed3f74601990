"""Which directory a resumed run continues in, and whether its config still fits the checkpoint.

Import-light: the CLI decides the run directory before Hydra creates one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from llmexp.errors import ConfigError, Problem
from llmexp.record import RunDir

# Keys a resumed run may change: how long and how often (and lr / clipping, to recover from a
# divergence), not what is trained.
MAY_CHANGE = ("resume", "task.max_new_tokens", "optim.lr", "trainer.gradient_clip_val", "trainer.max_steps", "trainer.epochs", "trainer.val_check_interval", "trainer.checkpoint_every_n_steps",
              "trainer.keep_checkpoints",
              "trainer.log_every_n_steps", "trainer.progress_bar", "trainer.limit_val_batches", "logger.")


def has_checkpoint(run_dir: Path) -> bool:
    return RunDir(run_dir).checkpoint_to_resume() is not None


def latest_unfinished_run(runs_root: Path) -> Optional[Path]:
    """The newest run directory under ``runs_root`` with a checkpoint and no summary.json."""
    if not runs_root.is_dir():
        return None
    candidates = [d for d in runs_root.iterdir() if d.is_dir() and has_checkpoint(d)
                  and not RunDir(d).finished()]
    return max(candidates, key=lambda d: d.stat().st_mtime, default=None)


def resume_run_dir(resume: Optional[str], explicit_run_dir: Optional[str], run_name: str) -> Optional[str]:
    """The run directory for ``resume=...`` (None: let Hydra make a fresh one)."""
    if resume in (None, "null"):
        return None
    if resume != "auto":
        _refuse_finished(Path(resume))
        if RunDir(resume).config.is_file() and not has_checkpoint(Path(resume)):
            raise ConfigError([Problem("resume", f"{resume!r} is a run that stopped before it wrote a checkpoint "
                                       "(trainer.checkpoint_every_n_steps sets how often), so there is nothing to "
                                       "resume", f"start it over in its directory with the same overrides and "
                                       f"hydra.run.dir={resume} resume=auto, or as a new run")])
        if not Path(resume).is_dir() or not has_checkpoint(Path(resume)):
            raise ConfigError([Problem("resume", f"{resume!r} is not a run directory with a checkpoint "
                                       "(checkpoints/last.ckpt or step-*.ckpt)",
                                       "give the run directory of the killed run, or resume=auto")])
        if explicit_run_dir and Path(explicit_run_dir).resolve() != Path(resume).resolve():
            raise ConfigError([Problem("hydra.run.dir", "a resumed run continues in its own directory",
                                       "drop hydra.run.dir, or set it to the resume directory")])
        return resume
    if explicit_run_dir:
        _refuse_finished(Path(explicit_run_dir))
        if has_checkpoint(Path(explicit_run_dir)):  # (a pipeline's or a sweep's fresh stage says nothing)
            print(f"resume=auto: resuming {explicit_run_dir}", file=sys.stderr)
        return explicit_run_dir
    found = latest_unfinished_run(Path("runs") / run_name)
    if found is None:  # it started a new run without a word, as if it had resumed
        print(f"resume=auto: no unfinished run with a checkpoint in runs/{run_name}/, so this is a new run (one "
              f"elsewhere: resume=<its directory>)", file=sys.stderr)
        return None
    print(f"resume=auto: resuming {found}, the newest unfinished run in runs/{run_name}/", file=sys.stderr)
    return str(found)


def _refuse_finished(run_dir: Path) -> None:
    """A finished run is never modified: resuming it would rewrite its checkpoints, metrics,
    summary and model."""
    if RunDir(run_dir).finished():
        raise ConfigError([Problem("resume", f"{str(run_dir)!r} is a finished run (it has summary.json), and a "
                                   "finished run is never modified",
                                   f"continue training from it in a new run: model.pretrained={run_dir}/model")])


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Config groups whose option (``<group>.name``) decides many keys at once: a different option is
# one problem, not one per key it changed (whose fixes, key by key, would not make the run fit).
GROUPS = ("stage", "data", "model", "peft", "strategy", "optim")


def incompatible_keys(saved: Dict[str, Any], new: Dict[str, Any]) -> List[Problem]:
    """Problems for keys whose value differs from the checkpointed run's config."""
    a, b = _flatten(saved), _flatten(new)
    problems, decided = [], []
    for group in GROUPS:
        was, now = a.get(f"{group}.name"), b.get(f"{group}.name")
        if was != now:
            problems.append(Problem(group, f"is {now} but the run being resumed is {group}={was}",
                                    f"{group}={was}, as the run was started (a resumed run must train the same "
                                    f"thing: give the overrides it started with, as its overrides.yaml lists them)"))
            decided.append(group + ".")
    if "stage." in decided:  # the stage chooses the data, the lr, the run's name: the rest follows from it
        return problems
    if "model." in decided:
        decided.append("run_name")
    for key in sorted(set(a) | set(b)):
        if any(key == m or (m.endswith(".") and key.startswith(m)) for m in (*MAY_CHANGE, *decided)):
            continue
        if a.get(key) != b.get(key):
            problems.append(Problem(key, f"is {b.get(key)!r} but the run being resumed used {a.get(key)!r}",
                                    f"{key}={a.get(key)} (a resumed run must train the same thing; only "
                                    f"trainer.max_steps, optim.lr, clipping and logging/validation intervals "
                                    f"may change)"))
    return problems
