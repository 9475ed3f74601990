"""The generic typed checker: a composed config against the dataclass schemas, every problem
collected at once. The bottom layer: it imports nothing of llmexp above config/ (the checks that
need data, plugins or evals are llmexp.preflight's), and no torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmexp.config import schema as S
from llmexp.config.stages import STAGES
from llmexp.errors import Problem, suggest


def typed_config(cfg: DictConfig) -> Tuple[Optional[S.RunConfig], List[Problem]]:
    """The typed config of ``cfg`` (None when it cannot be resolved) and every problem the
    schemas find in it: unknown keys, wrong types, values out of bounds or not among the choices."""
    problems: List[Problem] = []
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as e:
        return None, [_unresolvable(e)]
    raw.pop("hydra", None)
    typed = {}
    for group, schema in S.GROUP_SCHEMAS.items():
        typed[group] = _check_node(raw.get(group, {}), schema, group, problems)
    stage_raw = raw.get("stage", {}) or {}
    stage_name = stage_raw.get("name", "sft")
    spec = STAGES.get(stage_name)
    if spec is None:
        problems.append(Problem("stage.name", f"unknown stage {stage_name!r}", suggest(stage_name, STAGES)))
    stage_schema = spec.schema if spec else S.SFTStageConfig
    typed["stage"] = _check_node(stage_raw, stage_schema, "stage", problems)
    top_fields = {f.name for f in dataclasses.fields(S.RunConfig)} - set(typed)
    for key, value in raw.items():
        if key in typed:
            continue
        if key not in top_fields:
            problems.append(Problem(key, "unknown key", suggest(key, top_fields | set(typed))))
        else:
            typed[key] = value
    return S.RunConfig(**typed), problems


def _unresolvable(e: OmegaConfBaseException) -> Problem:
    """The problem of an interpolation that does not resolve, in one line (OmegaConf's message
    goes on with its full_key and object_type); an unset ``${oc.env:NAME}`` says to set NAME."""
    key, message = _full_key(e), str(e.msg).splitlines()[0]
    unset = re.search(r"Environment variable '([^']+)' not found", message)
    if unset:
        name = unset.group(1)
        return Problem(key, f"takes the environment variable {name}, which is not set",
                       f"export {name}=<value> first, or set {key}=<value> on the command line")
    return Problem(key, f"cannot resolve: {message}", None)


def _full_key(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", "") or "config")


def _check_node(value: Any, schema: type, path: str, problems: List[Problem]) -> Any:
    """Check one mapping against a dataclass; return the dataclass instance (or None)."""
    if not isinstance(value, dict):
        problems.append(Problem(path, f"expected a mapping of {schema.__name__} keys, got {value!r}", None))
        return schema()
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    base = OmegaConf.structured(schema)
    good = {}
    coerced_all = _coerce_together(base, {k: v for k, v in value.items() if k in fields and v != "???"
                                          and not dataclasses.is_dataclass(hints[k])
                                          and _dataclass_element(hints[k]) is None})
    for key, item in value.items():
        key_path = f"{path}.{key}"
        if key not in fields:
            problems.append(Problem(key_path, "unknown key", suggest(key, fields)))
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            good[key] = _check_node(item, hint, key_path, problems)
            continue
        element = _dataclass_element(hint)
        if element is not None:
            if not isinstance(item, list):
                problems.append(Problem(key_path, f"expected a list of {element.__name__} mappings, got {item!r}",
                                        None))
                continue
            good[key] = [_check_node(x, element, f"{key_path}[{i}]", problems) for i, x in enumerate(item)]
            continue
        if item == "???":
            problems.append(Problem(key_path, "a value is required",
                                    f"set it on the command line: {key_path}=..."))
            continue
        try:
            coerced = coerced_all[key] if coerced_all is not None else (
                OmegaConf.to_container(OmegaConf.merge(base, {key: item}))[key])
        except OmegaConfBaseException:
            problems.append(Problem(key_path, f"expected {_type_name(hint)}, got {item!r}",
                                    f"{key_path}=<{_type_name(hint)}>"))
            continue
        _check_metadata(coerced, fields[key].metadata, key_path, problems)
        good[key] = coerced
    for key, f in fields.items():
        if key not in good and key not in value and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            problems.append(Problem(f"{path}.{key}", "a value is required", f"{path}.{key}=..."))
    try:
        return schema(**good)
    except TypeError:
        return schema()


def _coerce_together(base: DictConfig, values: dict) -> Optional[dict]:
    """The values as the schema types them, merged in one go (a merge copies the whole node, so
    one per key cost a run ~0.3 s); None when one of them does not fit (each is then merged alone
    to name every one that does not)."""
    try:
        merged = OmegaConf.to_container(OmegaConf.merge(base, values))
    except OmegaConfBaseException:
        return None
    return {k: merged[k] for k in values}


def _dataclass_element(hint: Any) -> Optional[type]:
    """The dataclass of a ``List[<dataclass>]`` field, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (list, List) and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def check_options(values: dict, schema: Optional[type], key: str, where: str):
    """(instance of the ``schema`` dataclass built from ``values``, problems) for typed plugin options;
    an unknown option is reported under ``key`` with the valid names."""
    names = [f.name for f in dataclasses.fields(schema)] if schema else []
    problems = [Problem(key, f"unknown option {k!r} for {where}",
                        suggest(k, names) if names else f"{where} takes no options; drop it with ~{key}.{k}")
                for k in values if k not in names]
    if schema is None:
        return None, problems
    return _check_node({k: v for k, v in values.items() if k in names}, schema, key, problems), problems


def _check_metadata(value: Any, meta: Any, key_path: str, problems: List[Problem]) -> None:
    choices = meta.get("choices")
    values = value if isinstance(value, list) else [value]
    if choices is not None:
        for v in values:
            if v not in choices:
                names = [c for c in choices if c is not None]
                problems.append(Problem(key_path, f"{v!r} is not one of {', '.join(map(str, names))}",
                                        suggest(str(v), [str(n) for n in names], key=key_path)))
    lo, hi, above = meta.get("min"), meta.get("max"), meta.get("above")
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(Problem(key_path, f"must be a finite number, got {v}", f"{key_path}=<a number>"))
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if above is not None and v <= above:
                problems.append(Problem(key_path, f"must be > {above}, got {v}", None))
            if lo is not None and v < lo:
                problems.append(Problem(key_path, f"must be >= {lo}, got {v}", None))
            if hi is not None and v > hi:
                problems.append(Problem(key_path, f"must be <= {hi}, got {v}", None))


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    if typing.get_origin(hint) in (list, List):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint)))
