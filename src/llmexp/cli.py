"""`python -m llmexp` and the `llmexp` console script: Hydra's CLI with llmexp's error handling.

Command-line overrides are checked before Hydra sees them, so an unknown option, an unknown
key and a wrong type are reported together in one message (exit code 2) instead of one Hydra
traceback at a time. Heavy libraries are imported only once a run starts.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from llmexp.errors import ConfigError, Problem, UserError, report, suggest
from llmexp.paths import config_dir, config_groups

# Hydra flags that take a value in the next argument.
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                     "--cfg", "-c", "--package", "-p", "--experimental-rerun"}
# Flags after which Hydra only prints help or information: no need to check overrides.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc"}


def split_overrides(argv: List[str]) -> List[str]:
    """The override arguments of a Hydra command line (flags and their values dropped)."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def check_overrides(overrides: List[str]):
    """The composed config of the overrides, or ConfigError listing every problem in them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    groups = config_groups()
    problems: List[Problem] = []
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError([Problem("command line", str(e).splitlines()[0],
                                   "write overrides as key=value or group=option")]) from None
    selections, keys = [], []
    for o in parsed:
        key = o.key_or_group
        single = _single_value(o)
        if o.is_hydra_override():
            if key == "hydra.run.dir" and not _resuming(parsed) and not _distributed_child():
                problems.extend(_existing_run_problem(o.get_value_string()))
            continue
        if key in groups:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_string()]
            bad = [v for v in values if v not in groups[key] and v != "null" and not o.is_delete()]
            for v in bad:
                problems.append(Problem(f"{key}={v}", f"unknown {key} option", suggest(v, groups[key])))
            if not bad:
                selections.append(single)
        else:
            keys.append((o, single))
    cfg = _compose(selections, problems)
    if cfg is None:
        raise ConfigError(problems)
    valid = list(selections)
    for o, single in keys:
        problem = _key_problem(cfg, o)
        if problem:
            problems.append(problem)
        else:
            valid.append(single)
    cfg = _compose(valid, problems)
    if cfg is not None:
        from llmexp.config.validate import validate

        try:
            validate(cfg)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _distributed_child() -> bool:
    """A process Lightning (or torchrun) started for rank > 0 joins its parent's run directory."""
    import os

    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("RANK", "0") != "0"


def _resuming(parsed) -> bool:
    return any(o.key_or_group == "resume" and o.get_value_string() not in ("null", "") for o in parsed)


def run_dir_overrides(cfg, overrides: List[str]) -> List[str]:
    """``hydra.run.dir=...`` for a resumed run (it continues in its own directory) and for a run
    under torchrun/srun (all ranks share one directory)."""
    from llmexp.resume import resume_run_dir

    from llmexp.launch import shared_run_dir

    explicit = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), None)
    run_dir = resume_run_dir(cfg.get("resume"), explicit, str(cfg.run_name)) or shared_run_dir(str(cfg.run_name))
    return [f"hydra.run.dir={run_dir}"] if run_dir and not explicit else []


def _existing_run_problem(run_dir: str) -> List[Problem]:
    """Never write a run into a directory that already holds one (its record would be lost)."""
    from pathlib import Path

    held = [f for f in ("config.yaml", "summary.json", "checkpoints") if (Path(run_dir) / f).exists()]
    if held:
        return [Problem("hydra.run.dir", f"{run_dir!r} already holds a run ({', '.join(held)})",
                        "choose a new directory, or leave hydra.run.dir unset for a fresh timestamped one")]
    return []


def _single_value(o) -> str:
    """The override with a sweep reduced to its first value (for checking only)."""
    if not o.is_sweep_override():
        return o.input_line
    first = next(iter(o.sweep_string_iterator()))
    return f"{o.get_key_element()}={first}"


def _key_problem(cfg, o) -> Optional[Problem]:
    from omegaconf import OmegaConf

    key = o.key_or_group
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    exists = parent is not None and hasattr(parent, "keys") and leaf in list(parent.keys())
    if o.is_add() and exists:
        return Problem(key, "already exists; '+' only adds new keys", f"{key}=... (without '+')")
    if (o.is_add() or o.is_force_add()) and parent is not None:
        return None
    if exists:
        return None
    if parent is None or not hasattr(parent, "keys"):
        head = key.split(".")[0]
        return Problem(key, "unknown key", suggest(head, list(cfg.keys())) if head not in cfg
                       else f"{parent_key} is not a mapping")
    siblings = [str(k) for k in parent.keys()]
    hint = suggest(leaf, siblings)
    typed_options = parent_key == "data.options" and OmegaConf.select(cfg, "data.source") == "bundled"
    if (parent_key.endswith((".extra", ".options")) and not typed_options) or not siblings:
        hint = f"add a new key with +{key}=..."
    return Problem(key, "unknown key", hint)


def _compose(overrides: List[str], problems: List[Problem]):
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return compose("config", overrides=overrides)
    except HydraException as e:
        problems.append(Problem("command line", str(e).splitlines()[0], None))
        return None


def _task(cfg) -> Optional[float]:
    try:
        from llmexp.run import run

        return run(cfg)
    except UserError as e:
        sys.exit(report(e))


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        from llmexp.sweep.__main__ import main as run_sweep

        sys.exit(run_sweep(argv[1:]))
    if argv[:1] == ["pipeline"]:
        from llmexp.pipeline import main as run_pipeline

        sys.exit(run_pipeline(argv[1:]))
    if argv[:1] == ["plugins"]:
        from llmexp.plugins.listing import main as list_plugins

        sys.exit(list_plugins(argv[1:]))
    try:
        config_groups()  # loads the plugins: a broken one is reported for --help too
        if not _INFO_FLAGS.intersection(argv):
            overrides = split_overrides(argv)
            argv += run_dir_overrides(check_overrides(overrides), overrides)
    except UserError as e:
        sys.exit(report(e))
    import hydra

    sys.argv = [sys.argv[0]] + argv
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
