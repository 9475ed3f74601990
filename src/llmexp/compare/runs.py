"""Which run directories the user meant: paths, quoted globs, and sweep or pipeline directories
(their finished runs); anything else is refused naming the path and the fix."""

from __future__ import annotations

import glob
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from llmexp.errors import UserError
from llmexp.record import RunDir, read_metrics

_FIX = ("give finished run directories (each holds summary.json), a sweep or pipeline directory, "
        "or a quoted glob such as 'runs/sweeps/lr/trial-*'")


@dataclass
class Run:
    path: Path
    summary: Dict[str, Any]
    config: Dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> List[Dict[str, float]]:
        return read_metrics(RunDir(self.path).metrics)


def _children(path: Path) -> List[Path]:
    """The finished runs directly under a sweep or pipeline directory (or any folder of runs)."""
    return sorted(p for p in path.iterdir() if p.is_dir() and RunDir(p).finished())


def run_paths(args: List[str]) -> List[Path]:
    """Run directories in the order given, each once. Files among shell-expanded globs
    (``trial-*`` also matches ``trial-000.log``) are skipped with a note; a directory that is
    neither a run nor holds runs is a UserError."""
    found: List[Path] = []
    for arg in args:
        matches = [Path(m) for m in sorted(glob.glob(arg))] if glob.has_magic(arg) and not Path(arg).exists() else [Path(arg)]
        if not matches:
            raise UserError(f"compare: no run directories match {arg!r}; {_FIX}")
        for path in matches:
            if not path.exists():
                raise UserError(f"compare: {str(path)!r} does not exist; {_FIX}")
            if not path.is_dir():
                print(f"compare: skipped {path} (a file, not a run directory)", file=sys.stderr)
                continue
            if RunDir(path).finished():
                found.append(path)
            elif _children(path):
                found += _children(path)
                unfinished = sorted(p.name for p in path.iterdir() if p.is_dir() and RunDir(p).config.is_file()
                                    and not RunDir(p).finished())
                if unfinished:
                    print(f"compare: left out {len(unfinished)} run(s) in {path} that did not finish (stopped or "
                          f"failed: no summary.json): {', '.join(unfinished)}", file=sys.stderr)
                nested = sorted(p.name for p in path.iterdir() if p.is_dir() and not RunDir(p).config.is_file()
                                and not RunDir(p).finished() and _children(p))
                if nested:  # a pipeline's or a sweep's folder among the runs: one level is compared
                    print(f"compare: {len(nested)} folder(s) in {path} hold runs of their own, not compared: "
                          f"{', '.join(nested)} (give them as paths too to include their runs)", file=sys.stderr)
            elif RunDir(path).config.is_file():
                how = (f"resume it (resume={path})" if RunDir(path).checkpoint_to_resume() is not None else
                       f"it has no checkpoint: start it over (its overrides with hydra.run.dir={path} resume=auto)")
                raise UserError(f"compare: {path} is a run that did not finish (no summary.json); {how} or leave it out")
            else:
                raise UserError(f"compare: {path} is not a run directory (no summary.json, and no finished runs "
                                f"inside); {_FIX}")
    unique = list({p.resolve(): p for p in found}.values())
    if not unique:
        raise UserError(f"compare: no run directories among {' '.join(args)}; {_FIX}")
    return unique


def load_run(path: Path) -> Run:
    """summary.json and config.yaml of one run; a damaged record names its file."""
    import yaml

    record = RunDir(path)
    try:
        summary = record.summary() or {}
    except json.JSONDecodeError as e:
        raise UserError(f"compare: {record.summary_file} is not valid JSON ({e.msg}); the run's record is damaged: "
                        f"leave the run out") from None
    try:
        config = yaml.safe_load(record.config.read_text()) if record.config.is_file() else {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"compare: {record.config} is not valid YAML ({why}); the run's record is damaged: "
                        f"leave the run out") from None
    return Run(Path(path), with_later_evals(summary, Path(path)), config if isinstance(config, dict) else {})


def with_later_evals(summary: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """``summary`` with the tasks of evaluations made after training (python -m llmexp.eval <run>:
    eval/results.json, results-2.json, ...) that its own ``eval`` lacks, the newest of each: they
    were invisible to compare. The run's own results are kept as they were."""
    def number(f: Path) -> int:
        stem = f.stem.rpartition("-")[2]
        return int(stem) if stem.isdigit() else 1

    files = sorted((path / "eval").glob("results*.json"), key=number)
    own = summary.get("eval") or {}
    later: Dict[str, Any] = {}
    for f in files:
        try:
            table = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(table, dict):
            later.update({task: row for task, row in table.items() if task not in own and isinstance(row, dict)})
    return {**summary, "eval": {**own, **later}} if later else summary
