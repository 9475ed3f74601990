"""``llmexp pipeline NAME|FILE``: run stages in sequence, each in its own run directory, wiring each
run's output into the next (``${runs.<stage>}`` in a stage's overrides is an earlier stage's run
directory), then write one summary of the whole pipeline.

    llmexp pipeline rlhf                                  # SFT -> RM -> PPO
    llmexp pipeline dpo model=gpt2 dpo:trainer.max_steps=50 --dir runs/my-dpo

Overrides without a prefix apply to every stage; ``<stage>:key=value`` to one stage. Rerunning
with the same ``--dir`` skips finished stages and resumes an interrupted one from its checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from llmexp.argtypes import command_summary
from llmexp.errors import Problem, UserError, report, suggest
from llmexp.record import RunDir

PIPELINES_DIR = Path(__file__).resolve().parent / "pipelines"
REFERENCE = re.compile(r"\$\{runs\.([A-Za-z0-9_\-]+)\}")


@dataclass
class StageSpec:
    name: str
    overrides: List[str]


@dataclass
class PipelineSpec:
    name: str
    stages: List[StageSpec]
    overrides: List[str] = field(default_factory=list)


def available() -> List[str]:
    return sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml"))


def load_spec(name_or_path: str) -> PipelineSpec:
    """A shipped pipeline by name, or a YAML file; every problem names the file and the key."""
    import yaml

    path = Path(name_or_path)
    if not path.is_file():
        if name_or_path not in available():
            raise UserError(f"pipeline: no file {name_or_path!r} and no shipped pipeline of that name; "
                            f"{suggest(name_or_path, available())}")
        path = PIPELINES_DIR / f"{name_or_path}.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"pipeline: {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise UserError(f"pipeline: {path} needs a non-empty list under 'stages' (each with name and overrides)")
    stages, seen = [], set()
    for i, s in enumerate(raw["stages"]):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("overrides", []), list):
            raise UserError(f"pipeline: {path} stages[{i}] must be a mapping with a 'name' and a list 'overrides'")
        for ref in REFERENCE.findall(" ".join(map(str, s.get("overrides", [])))):
            if ref not in seen:
                raise UserError(f"pipeline: {path} stages[{i}] ({s['name']}) refers to ${{runs.{ref}}}, which is "
                                f"not an earlier stage; earlier stages: {', '.join(sorted(seen)) or 'none'}")
        if s["name"] in seen:
            raise UserError(f"pipeline: {path} names stage {s['name']!r} twice")
        seen.add(s["name"])
        stages.append(StageSpec(s["name"], [str(o) for o in s.get("overrides", [])]))
    return PipelineSpec(str(raw.get("name") or path.stem), stages, [str(o) for o in raw.get("overrides", [])])


def split_cli_overrides(spec: PipelineSpec, extra: List[str]) -> Dict[str, List[str]]:
    """Command-line overrides by stage: ``stage:key=value`` for one, plain ones for all."""
    names = [s.name for s in spec.stages]
    per_stage: Dict[str, List[str]] = {n: [] for n in names}
    for o in extra:
        prefix, sep, rest = o.partition(":")
        if "=" not in o and not (rest if sep else o).startswith("~"):  # said once, not by every stage
            raise UserError(f"pipeline: {o!r} is not an override; after the pipeline's name come key=value for every "
                            f"stage, or <stage>:key=value for one ({', '.join(names)})")
        for_one = bool(sep) and "=" not in prefix
        key = (rest if for_one else o).split("=", 1)[0].lstrip("+~")
        if key == "stage":
            named = ", ".join(f"{t.name}: stage={stage_option(t) or '?'}" for t in spec.stages)
            raise UserError(f"pipeline: {o!r}: each stage of {spec.name} is the stage its pipeline file names "
                            f"({named}), and "
                            f"stage= would replace it (a global one makes every stage that stage); change a "
                            f"stage's settings with <stage>:stage.<key>=<value>, or copy the pipeline file and "
                            f"edit it ({PIPELINES_DIR / (spec.name + '.yaml')})")
        if key == "experiment" and not for_one:
            raise UserError(f"pipeline: {o!r}: an experiment preset sets several groups, its stage's settings too, "
                            f"and a global one would give them to every stage of {spec.name} (and replace the short "
                            f"SFT's experiment=sft_short where a stage names it); give it to one stage: "
                            f"{names[0]}:{o}")
        if for_one:
            if prefix not in per_stage:
                raise UserError(f"pipeline: override {o!r} names stage {prefix!r}, not in {spec.name}; "
                                f"{suggest(prefix, names)}")
            per_stage[prefix].append(rest)
        else:
            for n in names:
                per_stage[n].append(o)
    return per_stage


def stage_option(stage: StageSpec) -> Optional[str]:
    """The stage= a pipeline stage runs (its overrides name it)."""
    return next((o.split("=", 1)[1] for o in stage.overrides if o.split("=", 1)[0].lstrip("+") == "stage"), None)


def stage_dir(root: Path, index: int, name: str) -> Path:
    return root / f"{index}-{name}"


def check_stages(spec: PipelineSpec, root: Path, per_stage: Dict[str, List[str]]) -> None:
    """Every stage's overrides checked as the CLI checks them, before any stage runs (a bad later
    stage must not leave an earlier one half done). Values naming an earlier stage's output are
    checked when that stage has produced it."""
    from llmexp.errors import ConfigError
    from llmexp.overrides import check_overrides

    problems, refused = [], {}  # refused: global override -> the stages that refused it
    common = set.intersection(*(set(given) for given in per_stage.values())) if len(per_stage) > 1 else set()
    everywhere = {o.split("=", 1)[0].lstrip("+~"): o for o in common}  # the command line's plain overrides
    for i, s in enumerate(spec.stages, 1):
        given = [*spec.overrides, *s.overrides, *per_stage[s.name]]
        pending = {o.split("=", 1)[0].lstrip("+~") for o in given if REFERENCE.search(o)}
        runs = {t.name: str(stage_dir(root, j, t.name).resolve()) for j, t in enumerate(spec.stages, 1)}
        try:
            check_overrides([REFERENCE.sub(lambda m: runs[m.group(1)], o) for o in given])
        except ConfigError as e:
            for p in e.problems:
                if p.key in everywhere:  # a key or value only some stages take
                    refused.setdefault(everywhere[p.key], []).append((s.name, p))
                elif p.key not in pending:
                    problems.append(dataclasses.replace(p, key=f"{s.name}:{p.key}"))
    names = [t.name for t in spec.stages]
    for o, refusals in refused.items():
        stages = [n for n, _ in refusals]
        takers = [n for n in names if n not in stages]
        if not takers:  # no stage has it: a typo, with each stage's suggestion
            problems += [dataclasses.replace(p, key=f"{n}:{p.key}") for n, p in refusals]
            continue
        why = (f"{', '.join(stages)} {'has' if len(stages) == 1 else 'have'} no such key"
               if all("unknown key" in p.message for _, p in refusals)
               else "; ".join(f"{n} refuses it ({p.message})" for n, p in refusals))
        problems.append(Problem(o, f"applies to every stage of {spec.name}, and {why}",
                                " ".join(f"{n}:{o}" for n in takers) + f" (for {'that stage' if len(takers) == 1 else 'those stages'} alone)"))
    if problems:
        raise ConfigError(problems)


def run_pipeline(spec: PipelineSpec, root: Path, extra: List[str]) -> Dict[str, Any]:
    started = time.time()
    per_stage = split_cli_overrides(spec, extra)
    check_stages(spec, root, per_stage)
    check_no_stale_stage(spec, root, per_stage)
    root.mkdir(parents=True, exist_ok=True)
    print(f"pipeline {spec.name} in {root} (the same command with --dir {root} continues it)", flush=True)
    runs: Dict[str, str] = {}
    results = []
    for i, s in enumerate(spec.stages, 1):
        run_dir = stage_dir(root, i, s.name)
        runs[s.name] = str(run_dir.resolve())
        overrides = [REFERENCE.sub(lambda m: runs[m.group(1)], o)
                     for o in [*spec.overrides, *s.overrides, *per_stage[s.name]]]
        record = RunDir(run_dir)
        if record.finished():
            check_kept(s.name, record, overrides)
            print(f"[{i}/{len(spec.stages)}] {s.name}: finished before, kept ({run_dir})", flush=True)
        else:
            # (checkpoints/ alone is no checkpoint: the run saves its tokenizer there as training starts)
            resume = ["resume=" + str(run_dir)] if record.checkpoint_to_resume() is not None else []
            if run_dir.exists() and not resume:  # a stage that died before its first checkpoint
                run_dir.rename(run_dir.with_name(f"{run_dir.name}.failed-{int(time.time())}"))
            print(f"[{i}/{len(spec.stages)}] {s.name}: llmexp {' '.join(overrides)}", flush=True)
            code = run_stage([sys.executable, "-m", "llmexp", *overrides, *resume, f"hydra.run.dir={run_dir}"])
            if code in (INTERRUPTED, TERMINATED, -2, -15):  # negative: ended by the signal itself, before its handler ran
                raise PipelineInterrupted(s.name, root, run_dir)
            if code != 0:
                raise PipelineStageFailed(s.name, code, run_dir)
        summary = record.summary()
        results.append({"name": s.name, "stage": summary["stage"], "run_dir": str(run_dir.resolve()),
                        "model_dir": summary.get("model_dir"), "global_step": summary["global_step"],
                        "initial": summary["initial"], "final": summary["final"],
                        "wall_seconds": summary.get("wall_seconds"), "overrides": overrides,
                        "parameters": summary.get("parameters"), "compression": summary.get("compression")})
    # every stage's own time, its sessions before a resume included (this command's alone said 1 s
    # for a pipeline resumed at its last step)
    out = {"pipeline": spec.name, "dir": str(root.resolve()), "stages": results,
           "wall_seconds": max(time.time() - started, sum(r["wall_seconds"] or 0.0 for r in results))}
    (root / "pipeline_summary.json").write_text(json.dumps(out, indent=2))
    return out


def check_no_stale_stage(spec: PipelineSpec, root: Path, per_stage: Dict[str, List[str]]) -> None:
    """A finished stage that starts from an earlier stage's run which will run again (it was deleted,
    or never finished) is refused before anything runs: it was kept, trained from a run that no
    longer exists, and the summary paired it with the new one."""
    inputs: Dict[str, set] = {}
    for s in spec.stages:  # the stages each stage starts from, directly or through another
        named = set(REFERENCE.findall(" ".join([*spec.overrides, *s.overrides, *per_stage.get(s.name, [])])))
        inputs[s.name] = named.union(*(inputs.get(n, set()) for n in named))
    again = {s.name for i, s in enumerate(spec.stages, 1) if not RunDir(stage_dir(root, i, s.name)).finished()}
    for i, s in enumerate(spec.stages, 1):
        stale = sorted(inputs[s.name] & again)
        run_dir = stage_dir(root, i, s.name)
        if stale and RunDir(run_dir).finished():
            raise UserError(f"pipeline: stage {s.name!r} finished in {run_dir} from the run of {', '.join(stale)}, "
                            f"which is not finished there and would run again; delete {run_dir} too to run it from "
                            f"the new one, or use a new --dir")


def check_kept(name: str, record: RunDir, overrides: List[str]) -> None:
    """A finished stage is kept only if it ran with the overrides it would run with now; otherwise
    a changed override would silently go unused."""
    from llmexp.secrets import redact_override

    def normal(given: List[str]) -> List[str]:  # the CLI may have added a '+' to a typed option
        return sorted(redact_override(o).lstrip("+") for o in given)

    was = record.overrides()
    if was is not None and normal(was) != normal(overrides):
        raise UserError(f"pipeline: stage {name!r} finished in {record.path} with overrides {was}, but would now "
                        f"run with {overrides}; use a new --dir, or delete {record.path} to run the stage again")


INTERRUPTED = 130  # a run stopped by Ctrl+C exits with it (llmexp.run.Interrupted), as a shell reports it
TERMINATED = 143  # ... and one stopped by SIGTERM


def run_stage(command: List[str]) -> int:
    """A stage's run to its end, in its own session: Ctrl+C in the terminal reaches this process
    alone, which passes each on, so the run stops as Ctrl+C stops a run (when its step ends, with
    a checkpoint of it; Ctrl+C again: at once, from its last checkpoint); SIGTERM and SIGHUP are
    passed on as SIGTERM. Returns the run's exit code."""
    import signal
    import threading

    proc = subprocess.Popen(command, env=os.environ.copy(), start_new_session=True)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda *_: proc.send_signal(signal.SIGTERM))
                    for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class PipelineInterrupted(Exception):
    def __init__(self, stage: str, root: Path, run_dir: Path):
        super().__init__(stage, root)
        self.stage, self.root, self.code = stage, root, INTERRUPTED
        self.checkpoint = RunDir(run_dir).checkpoint_to_resume()

    def message(self, again: List[str]) -> str:
        """``again``: the command line that continues the pipeline."""
        import shlex

        from llmexp.record import checkpoint_step

        where = (f"{self.stage} resumes from its last checkpoint (step {checkpoint_step(self.checkpoint)})"
                 if self.checkpoint else f"{self.stage} starts over (it had written no checkpoint)")
        return (f"pipeline: interrupted in stage {self.stage!r}: `{shlex.join(again)}` continues it ({self.root} "
                f"keeps the finished stages; {where})")


class PipelineStageFailed(Exception):
    def __init__(self, name: str, code: int, run_dir: Path):
        super().__init__(f"pipeline: stage {name!r} failed (exit code {code}); its run directory is {run_dir}; "
                         f"fix the problem above and rerun the same command with --dir to continue from it")
        self.code = code


def model_size(stage: Dict[str, Any], stages: List[Dict[str, Any]]) -> str:
    """What a stage's model is: its parameters and, from a compression stage, its weights' bytes and
    how much smaller they are than the model it started from (an earlier stage's, named), so that
    the distill pipeline's summary shows what its task metric bought."""
    params = stage.get("parameters")
    text = f"{params:,} parameters" if params else ""
    c = stage.get("compression") or {}
    if c.get("weight_bytes_after") and c.get("size_ratio"):
        source = {str((Path(s["run_dir"]) / "model").resolve()): s["name"] for s in stages}
        than = f" than {source[c['model_before']]}'s" if c.get("model_before") in source else ""
        text += f", {c['weight_bytes_after']:,} weight bytes ({c['size_ratio']:.1f}x smaller{than})"
    return text


def print_summary(out: Dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pipeline {out['pipeline']} ({out['wall_seconds']:.0f}s)")
    for col in ("stage", "steps", "metric", "initial", "final", "run"):
        table.add_column(col)
    for s in out["stages"]:
        keys = sorted(set(s["initial"]) | set(s["final"]))
        main = [k for k in keys if k in ("val/task_score", "val/loss", "val/accuracy", "val/reward")]
        for j, key in enumerate(main or keys[:1]):
            first = j == 0
            table.add_row(s["name"] if first else "", str(s["global_step"]) if first else "", key,
                          f"{s['initial'].get(key, float('nan')):.4f}", f"{s['final'].get(key, float('nan')):.4f}",
                          s["run_dir"] if first else "")
    Console().print(table)
    task = [f"{s['name']} {s['initial']['val/task_score']:.3f} -> {s['final']['val/task_score']:.3f}"
            for s in out["stages"] if "val/task_score" in s["final"] and "val/task_score" in s["initial"]]
    if task:  # the metric a user cares about, on one line that no table width crops
        print("task metric (val/task_score): " + ", ".join(task))
    sizes = [f"{s['name']} {model_size(s, out['stages'])}" for s in out["stages"] if s.get("parameters")]
    if sizes:
        print("models: " + "; ".join(sizes))
    print(f"pipeline summary: {out['dir']}/pipeline_summary.json")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="llmexp pipeline", description=command_summary(__doc__),
                                 epilog=f"shipped pipelines: {', '.join(available())}")
    ap.add_argument("spec", help="a shipped pipeline name or a pipeline YAML file")
    ap.add_argument("overrides", nargs="*", help="key=value for every stage, or <stage>:key=value for one")
    ap.add_argument("--dir", default=None, help="pipeline directory (default runs/pipelines/<name>/<time>); "
                                                "rerun with it to continue")
    args = ap.parse_intermixed_args(argv)  # overrides before or after --dir
    try:
        spec = load_spec(args.spec)
        split_cli_overrides(spec, args.overrides)
        root = Path(args.dir or Path("runs") / "pipelines" / spec.name / time.strftime("%Y%m%d-%H%M%S"))
        out = run_pipeline(spec, root, args.overrides)
    except UserError as e:
        return report(e)
    except PipelineInterrupted as e:
        sys.stderr.write(f"llmexp: {e.message(['llmexp', 'pipeline', args.spec, *args.overrides, '--dir', str(e.root)])}\n")
        return e.code
    except PipelineStageFailed as e:
        sys.stderr.write(f"llmexp: error: {e}\n")
        return e.code
    print_summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
