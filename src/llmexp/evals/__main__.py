"""Evaluate an existing run or HF model directory, without training.

    python -m llmexp.eval runs/sft-llama/<time>                  # the run's model/, results into its eval/
                                                                 # (its configured eval=, else the tasks below)
    python -m llmexp.eval run=runs/sft-llama/<time> --tasks arithmetic_gen --limit 50
    python -m llmexp.eval path/to/hf_model --tasks mytask --include-path my_tasks/ --out results/
    python -m llmexp.eval runs/sft-llama/<time> --tasks answer_match,arithmetic_gen   # a plugin eval too

Writes ``<out>/results.json`` in the same format as a training run's ``eval/results.json``
(``results-2.json``, ... when it is taken: nothing recorded before is overwritten).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import List, Optional

from llmexp.argtypes import command_summary
from llmexp.argtypes import non_negative_int, positive_int
from llmexp.errors import UserError, quiet_exits, report
from llmexp.record import load_language_model, model_dir_of

DEFAULT_TASKS = "arithmetic_mc,arithmetic_gen,arithmetic_ppl"


@quiet_exits
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmexp.eval", description=command_summary(__doc__))
    ap.add_argument("target", help="run directory, run=<dir>, or an HF model directory")
    ap.add_argument("--tasks", default=None,
                    help="comma-separated lm-eval tasks and registered evals (llmexp plugins lists them; "
                         "run with their default options); default: a run's configured eval (eval=, with its "
                         f"options), else {DEFAULT_TASKS}")
    ap.add_argument("--include-path", default=None, help="a directory of your own lm-eval task YAMLs")
    ap.add_argument("--limit", type=positive_int, default=None,
                    help="at most this many documents per lm-eval task (registered evals: their options)")
    ap.add_argument("--batch-size", type=positive_int, default=None, help="(default: 32, or the run's eval's)")
    ap.add_argument("--num-fewshot", type=non_negative_int, default=None)
    ap.add_argument("--no-chat-template", action="store_true")
    ap.add_argument("--online", action="store_true", help="allow tasks from lm-eval's registry (downloads)")
    ap.add_argument("--out", default=None, help=(
        "output directory (default: <run>/eval or <model>/eval, as results.json or, when taken, results-2.json, ...)"))
    args = ap.parse_args(argv)
    from llmexp.env import configure_environment

    configure_environment(offline=not args.online)
    try:
        from llmexp.config.schema import EvalConfig
        from llmexp.errors import ConfigError, Problem, suggest
        from llmexp.evals.tasks import task_names
        from llmexp.plugins.evaluation import eval_options, run_eval
        from llmexp.plugins.registry import evals

        configured = configured_eval(args.target) if args.tasks is None else None
        if configured is not None:
            if configured.eval.name != "lm_eval":
                limit_ignored(args.limit, [configured.eval.name], False)
            return _evaluate_as_configured(configured, args)
        tasks = [t.strip() for t in (args.tasks or DEFAULT_TASKS).split(",") if t.strip()]
        problems = []
        if not tasks:
            problems.append(Problem("--tasks", f"names no task ({args.tasks!r})",
                                    f"comma-separated task names, e.g. --tasks {DEFAULT_TASKS}"))
        if args.include_path and not Path(args.include_path).is_dir():
            problems.append(Problem("--include-path", f"{args.include_path!r} is not a directory",
                                    "give the directory of your lm-eval task YAML files"))
        if problems:
            raise ConfigError(problems)
        registered = evals()  # plugin evals (and llmexp's own) run by name, next to lm-eval tasks
        lm_tasks = [t for t in tasks if t not in registered]
        limit_ignored(args.limit, [t for t in tasks if t in registered], bool(lm_tasks))
        cfg = EvalConfig(name="lm_eval", tasks=lm_tasks, include_path=args.include_path, limit=args.limit,
                         batch_size=args.batch_size or 32, num_fewshot=args.num_fewshot,
                         apply_chat_template=not args.no_chat_template)
        if not args.online:
            names = task_names(args.include_path)
            bad = [Problem("--tasks", f"unknown task {t!r} (offline: bundled tasks, --include-path and registered "
                                      f"evals only; --online reaches lm-eval's registry)",
                           suggest(t, [*names, *registered]))
                   for t in lm_tasks if t not in names]
            if bad:
                raise ConfigError(bad)
        from llmexp.evals.tasks import missing_data_files

        unread = [Problem("--include-path", m.partition("; ")[0], m.partition("; ")[2])
                  for m in missing_data_files(args.include_path, lm_tasks)]
        if unread:
            raise ConfigError(unread)
        options = {t: eval_options(t, {}, key="--tasks") for t in tasks if t in registered}
        model_dir = model_dir_of(args.target)

        out = Path(args.out) if args.out else (model_dir.parent if model_dir.name == "model" else model_dir)
        model, tokenizer = load_language_model(model_dir)
        from llmexp.evals.runner import fresh_results_path

        results = fresh_results_path(out if args.out else out / "eval")
        table = {}
        if lm_tasks:
            from llmexp.evals.lm_eval_bridge import run_lm_eval

            table.update(run_lm_eval(model, tokenizer, cfg, offline=not args.online))
        for name, typed in options.items():
            flat = run_eval(name, model, tokenizer, typed, run_dir=details_dir(results))
            table[name] = {key.split("/", 1)[1]: value for key, value in flat.items()}
    except UserError as e:
        return report(e)
    _record_and_show(table, results, f"eval of {model_dir}")
    return 0


def details_dir(results: Path) -> Path:
    """Where a registered eval writes its details (its ``run_dir``, made, as a run's is): beside its
    results file, named alike (eval/results-2/); given the run directory, it wrote over the details
    of the run's own. Left empty (the eval failed, or wrote none), it is removed at exit."""
    import atexit

    path = results.with_suffix("")
    path.mkdir(parents=True, exist_ok=True)

    def tidy() -> None:
        try:
            path.rmdir()  # only when empty
        except OSError:
            pass

    atexit.register(tidy)
    return path


def _record_and_show(table, path: Path, title: str) -> Path:
    """The results recorded at ``path`` and printed; returns their file."""
    from llmexp.evals.runner import print_table, record_anew

    record_anew(table, path)
    print_table(table, title)
    print(f"results: {path}")
    return path


def configured_eval(target: str):
    """The typed config of the run at ``target`` when it configured an eval (eval= not none), else None."""
    import yaml

    from llmexp.record import RunDir

    path = Path(target.split("=", 1)[1] if target.startswith("run=") else target)
    config = RunDir(path).config
    if not config.is_file():
        return None
    raw = yaml.safe_load(config.read_text()) or {}
    if (raw.get("eval") or {}).get("name", "none") == "none":
        return None
    from omegaconf import OmegaConf

    from llmexp.config.check import typed_config
    from llmexp.errors import ConfigError

    typed, problems = typed_config(OmegaConf.create(raw))
    if problems:
        raise ConfigError([dataclasses.replace(p, key=f"{config}: {p.key}") for p in problems])
    return typed


def limit_ignored(limit: Optional[int], registered: List[str], with_lm_eval: bool) -> None:
    """--limit cuts lm-eval tasks only: a registered eval asks what its options say (--limit was
    silently ignored, and its result read as one on --limit documents). Refused when it would
    apply to nothing; said when it applies to some of the tasks."""
    if limit is None or not registered:
        return
    names = ", ".join(repr(n) for n in registered)
    if not with_lm_eval:
        raise UserError(f"--limit: applies to lm-eval tasks only, and {names} "
                        f"{'is a registered eval' if len(registered) == 1 else 'are registered evals'} (its options "
                        f"say how much it asks: eval.options.<key> in a run); leave out --limit")
    print(f"note: --limit {limit} applies to the lm-eval tasks, not to {names} (registered evals ask what their "
          f"options say)", file=sys.stderr)


def _evaluate_as_configured(typed, args) -> int:
    """The run's own eval (name, tasks, options) on its model, flags given replacing its values."""
    from llmexp.evals.runner import evaluate, fresh_results_path

    given = {"include_path": args.include_path, "limit": args.limit, "batch_size": args.batch_size,
             "num_fewshot": args.num_fewshot}
    given = {k: v for k, v in given.items() if v is not None}
    if args.no_chat_template:
        given["apply_chat_template"] = False
    typed = dataclasses.replace(typed, eval=dataclasses.replace(typed.eval, **given), offline=not args.online)
    model_dir = model_dir_of(args.target)
    out = Path(args.out) if args.out else model_dir.parent
    model, tokenizer = load_language_model(model_dir)
    results = fresh_results_path(out if args.out else out / "eval")
    table = evaluate(typed, model, tokenizer, details_dir(results))
    _record_and_show(table, results, f"eval of {model_dir} (the run's eval={typed.eval.name})")
    if not given and not args.out:
        _complete_the_record(out, table, results)
    return 0


def _complete_the_record(run_dir: Path, table, results: Path) -> None:
    """A run whose eval after training failed (summary.json ``eval_error``), evaluated now as it was
    configured: its summary.json gets the eval it lacked (``eval``, ``eval_results``), so compare
    and sweeps see it; it kept eval_error for good before."""
    import json

    from llmexp.record import RunDir, write_atomic

    summary_file = RunDir(run_dir).summary_file
    if not summary_file.is_file():
        return
    summary = json.loads(summary_file.read_text())
    if "eval_error" not in summary:
        return
    summary["eval_failed_after_training"] = summary.pop("eval_error")
    summary.update(eval=table, eval_results=str(results))
    write_atomic(summary_file, json.dumps(summary, indent=2))
    print(f"{summary_file}: eval recorded (the run's eval after training had failed)")


if __name__ == "__main__":
    sys.exit(main())
