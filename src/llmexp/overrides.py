"""Command-line overrides checked before Hydra sees them: an unknown option, an unknown key and a
wrong type are reported together in one message (exit code 2) instead of one Hydra traceback at
a time. Used by ``python -m llmexp`` and by sweeps (each trial's overrides)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional

from llmexp.errors import ConfigError, Problem, suggest
from llmexp.paths import config_dir, config_groups
from llmexp.run_lock import distributed_child

# Hydra flags that take a value in the next argument.
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                     "--cfg", "-c", "--package", "-p", "--experimental-rerun"}


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
    return resolve_overrides(overrides)[0]


def resolve_overrides(overrides: List[str]):
    """(composed config, the overrides as Hydra must get them), or ConfigError listing every
    problem. A bundled dataset's typed option that its YAML leaves at the schema default
    (``data.options.misread_fraction=0.1``) is passed as an addition (``+data.options...``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    groups = config_groups()
    problems: List[Problem] = []
    bare = next((o for o in overrides if "=" not in o and not o.startswith(("-", "+", "~"))), None)
    if bare is not None:  # `llmexp resume <dir>`, `llmexp train`: a command llmexp does not have
        from llmexp.commands import SUBCOMMANDS
        from llmexp.config.stages import STAGES

        hint = ("resume is an override: python -m llmexp <the run's overrides> resume=<run dir> (or resume=auto)"
                if bare == "resume" else f"write overrides as key=value or group=option (stage={bare}?)"
                if bare in STAGES else "write overrides as key=value or group=option")
        raise ConfigError([Problem("command line", f"{bare!r} is neither an override (key=value) nor a command "
                                   f"({', '.join(sorted(SUBCOMMANDS))})", hint)])
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
            if key == "hydra.run.dir" and not _resuming(parsed) and not distributed_child():
                problems.extend(_existing_run_problem(o.get_value_string()))
            continue
        if key == "scale":  # chosen by stage and model: scale=dpo_llama_1b alone failed on dpo's keys
            stage, _, model = o.get_value_string().partition("_")
            problems.append(Problem(f"scale={o.get_value_string()}", "the real-size presets are chosen by stage= and "
                                    "model= (conf/scale/<stage>_<model>.yaml, where one is shipped), not by hand",
                                    f"stage={stage} model={model}" if model else "drop scale="))
            continue
        if key in groups:
            values = sweep_values(o) if o.is_sweep_override() else [o.get_value_string()]
            bad = [v for v in values if v not in groups[key] and v != "null" and not o.is_delete()]
            for v in bad:
                problems.append(Problem(f"{key}={v}", f"unknown {key} option", suggest(v, groups[key])))
            if not bad:
                selections.append(single)
        else:
            keys.append((o, single))
    plain = not problems and all(not (o.is_add() or o.is_force_add() or o.is_delete()) for o, _ in keys)
    cfg = _compose([*selections, *(single for _, single in keys)], []) if plain else None
    if cfg is not None:  # every key is one the config has (Hydra's config is struct): nothing to check
        return _preflighted(cfg, problems, [*selections, *(single for _, single in keys)]), list(overrides)
    cfg = _compose(selections, problems)
    if cfg is None:
        raise ConfigError(problems)
    valid = list(selections)
    as_given = {}
    # the names that decide which typed options exist, as the overrides set them
    chosen = {o.key_or_group: o.get_value_string() for o, _ in keys
              if o.key_or_group in ("data.source", "data.name", "eval.name") and not o.is_delete()}
    for o, single in keys:
        if _typed_option_to_add(cfg, o, chosen):
            valid.append(f"+{single}")
            as_given[o.input_line] = f"+{o.input_line}"
            continue
        problem = _key_problem(cfg, o, chosen)
        if problem:
            problems.append(problem)
        else:
            valid.append(single)
    cfg = _compose(valid, problems)
    return _preflighted(cfg, problems, valid), [as_given.get(o, o) for o in overrides]


def _preflighted(cfg, problems: List[Problem], overrides: List[str]):
    """``cfg`` once llmexp.preflight found nothing wrong in it, else ConfigError with every problem."""
    if cfg is not None:
        from llmexp.preflight import preflight

        try:
            preflight(cfg, overrides)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _typed_option_to_add(cfg, o, chosen: Dict[str, str]) -> bool:
    """An override of a typed option (a bundled dataset's ``data.options.*``, a plugin eval's
    ``eval.options.*``) that the config does not list (the schema holds its default), so Hydra must
    be told to add it; a name the schema lacks stays an unknown key."""
    from omegaconf import OmegaConf

    parent_key, _, leaf = o.key_or_group.rpartition(".")
    typed = _typed_options(cfg, parent_key, chosen)
    if typed is None or o.is_add() or o.is_force_add() or o.is_delete():
        return False
    options = OmegaConf.select(cfg, parent_key)
    return (options is None or leaf not in options) and leaf in typed[1]


def _typed_options(cfg, parent_key: str, chosen: Optional[Dict[str, str]] = None):
    """(what declares them, declared names) when ``parent_key`` holds typed options: ``data.options``
    of a bundled dataset, ``eval.options`` (a plugin eval's; none, lm_eval take none); else None.
    ``chosen``: data.source, data.name, eval.name as the command line sets them."""
    from omegaconf import OmegaConf

    from llmexp.plugins.registry import datasets, evals

    def value(key: str) -> str:
        return str((chosen or {}).get(key, OmegaConf.select(cfg, key)))

    if parent_key == "data.options" and value("data.source") == "bundled":
        name, entries, what = value("data.name"), datasets(), "dataset"
    elif parent_key == "eval.options":
        name, entries, what = value("eval.name"), evals(), "eval"
        if name in ("none", "lm_eval"):
            return f"eval={name}", []
    else:
        return None
    entry = entries.get(name)
    if entry is None:  # an unknown name (the preflight says so): suggest among the given options
        given = OmegaConf.select(cfg, parent_key) or {}
        return f"{what} {name!r}, which is not registered", sorted(str(k) for k in given)
    schema = entry.declaration.options
    return entry.describe(what), [f.name for f in dataclasses.fields(schema)] if schema else []


def _resuming(parsed) -> bool:
    return any(o.key_or_group == "resume" and o.get_value_string() not in ("null", "") for o in parsed)


def _unwritable(path: Path) -> Optional[str]:
    """Why a run could not be written at ``path`` (tried for real and undone: permissions alone do
    not tell for root or a read-only mount), or None."""
    import tempfile

    try:
        if not path.exists():
            first_new = next(p for p in reversed((path, *path.parents)) if not p.exists())
            first_new.mkdir()
            first_new.rmdir()
        else:
            with tempfile.TemporaryFile(dir=path):
                pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def _existing_run_problem(run_dir: str) -> List[Problem]:
    """Never write a run into a directory that already holds one (its record would be lost)."""
    from llmexp.record import RunDir

    path = Path(run_dir).expanduser()
    if path.exists() and not path.is_dir():
        return [Problem("hydra.run.dir", f"{run_dir!r} is a file, not a directory", "choose a directory path")]
    why = _unwritable(path)
    if why:
        return [Problem("hydra.run.dir", f"cannot create the run directory {run_dir!r}: {why}",
                        "choose a directory you can write, e.g. hydra.run.dir=$HOME/runs/<name>")]
    record = RunDir(run_dir)
    held, written = record.held(), record.would_overwrite()
    if written:
        what = f"a run ({', '.join(held)})" if held else f"{', '.join(written)}, which a run writes and would replace"
        return [Problem("hydra.run.dir", f"{run_dir!r} already holds {what}",
                        "choose a new directory, or leave hydra.run.dir unset for a fresh timestamped one")]
    return []


def sweep_values(o) -> List[str]:
    """The values a swept override takes, as Hydra's basic sweeper enumerates them: a glob over a
    config group's options expanded here (Hydra's own enumeration needs its config loader, and
    crashed with "ConfigLoader is not set"); ConfigError for an interval, which only a sweeper
    plugin samples."""
    from hydra.core.override_parser.types import Glob

    key = o.get_key_element()
    if not o.is_discrete_sweep():
        raise ConfigError([Problem(key, f"{o.input_line.split('=', 1)[1]}: an interval is sampled by a sweeper plugin "
                                   "(Optuna, Ax), which llmexp does not use", "choice(...) or range(...) with -m, or "
                                   "llmexp sweep <W&B sweep file> (distribution: log_uniform_values, ...)")])
    if isinstance(o.value(), Glob):
        groups = config_groups()
        options = groups.get(o.key_or_group)
        if options is None:
            raise ConfigError([Problem(key, "glob() chooses among a config group's options, and this is not a group",
                                       f"list the values: {key}=a,b (with -m)")])
        return list(o.value().filter(options))
    return list(o.sweep_string_iterator())


def _single_value(o) -> str:
    """The override with a sweep reduced to its first value (for checking only)."""
    if not o.is_sweep_override():
        return o.input_line
    values = sweep_values(o)
    if not values:
        raise ConfigError([Problem(o.get_key_element(), f"{o.input_line.split('=', 1)[1]} names no value",
                                   "give at least one")])
    return f"{o.get_key_element()}={values[0]}"


def _key_problem(cfg, o, chosen: Dict[str, str]) -> Optional[Problem]:
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
    from llmexp.config.aliases import alias_hint

    alias = alias_hint(key, OmegaConf.select(cfg, "stage.name"))
    if alias:
        return Problem(key, "unknown key", alias)
    if parent is None or not hasattr(parent, "keys"):
        head = key.split(".")[0]
        return Problem(key, "unknown key", suggest(head, list(cfg.keys())) if head not in cfg
                       else f"{parent_key} is not a mapping")
    typed = _typed_options(cfg, parent_key, chosen)
    if typed is not None:  # declared options: a typo gets the valid names, never a '+' to add it
        what, names = typed
        return Problem(key, f"unknown key: not an option of {what}",
                       suggest(leaf, names) if names else f"drop {key}" + (
                           f"; choose a registered {parent_key.split('.')[0]} first" if "not registered" in what
                           else f" ({what} takes no options)"))
    siblings = sorted(str(k) for k in parent.keys())
    hint = suggest(leaf, siblings)
    if parent_key.endswith((".extra", ".options")) or not siblings:
        hint = f"add a new key with +{key}=..."
    return Problem(key, "unknown key", hint)


def compose(overrides: List[str]):
    """The config Hydra composes for ``overrides`` (nothing more checked), or ConfigError."""
    problems: List[Problem] = []
    cfg = _compose(overrides, problems)
    if cfg is None:
        raise ConfigError(problems)
    return cfg


def _compose(overrides: List[str], problems: List[Problem]):
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return compose("config", overrides=overrides)
    except HydraException as e:
        problems.append(_compose_problem(e, overrides))
        return None


def _compose_problem(error: Exception, overrides: List[str]) -> Problem:
    """Hydra's refusal as one problem: a key the config has not (``trainer.max_stepz=5`` where only
    Hydra composes, as for --help; a dict given to a key, data.options={n: 40}) is named by that key
    with the closest one (Hydra's first line said only 'Could not override ...', and its fix,
    '+data.options=...', is refused as existing)."""
    full_key = getattr(error.__cause__, "full_key", None)
    if not (full_key and "not in struct" in str(error.__cause__)):
        return Problem("command line", str(error).splitlines()[0], None)
    parent, _, leaf = full_key.rpartition(".")
    rest = [o for o in overrides if not full_key.startswith(o.lstrip("+~").split("=", 1)[0])]
    cfg = _compose(rest, []) if rest != overrides else None
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.select(cfg, parent) if cfg is not None and parent else None
    if isinstance(node, DictConfig):
        return Problem(full_key, "unknown key", suggest(leaf, list(node.keys())))
    return Problem(full_key, "unknown key", f"give the keys {parent or 'the config'} has, one per override")
