"""A W&B sweep specification: load, check against the W&B schema and against llmexp's config.

The same YAML drives ``wandb sweep FILE`` online and ``llmexp sweep FILE`` offline. Parameters
are Hydra override keys (``optim.lr``); the command passes them as ``${args_no_hyphens}``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from llmexp.errors import ConfigError, Problem, UserError, suggest

# Command items that are W&B macros or the program itself, not fixed llmexp overrides.
_MACROS = ("${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_json}",
           "${args_json_file}", "python", "python3", "-m", "llmexp")


@dataclass
class SweepSpec:
    path: Path
    config: Dict[str, Any]
    extra: List[str] = field(default_factory=list)  # overrides from the command line, for every trial

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.stem)

    @property
    def metric(self) -> str:
        return self.config["metric"]["name"]

    @property
    def goal(self) -> str:
        return self.config["metric"].get("goal", "minimize")

    @property
    def parameters(self) -> Dict[str, Any]:
        return self.config.get("parameters", {})

    def environment(self) -> Dict[str, Optional[str]]:
        """The environment variables the trials' overrides read (``${oc.env:SFT_MODEL}``), as they are
        now: a sweep resumed with another value would compare trials of other runs (a dpo trial from
        one SFT beside a kto trial from another, said nowhere)."""
        import os
        import re

        names = re.findall(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)", " ".join(self.fixed_overrides()))
        return {name: os.environ.get(name) for name in sorted(set(names))}

    def fixed_overrides(self) -> List[str]:
        """Overrides written into the spec's ``command`` (e.g. trainer.max_steps=200), then those given
        on the command line (which win)."""
        return [str(c) for c in self.config.get("command", []) if str(c) not in _MACROS and "=" in str(c)] + self.extra

    def better(self, a: float, b: float) -> bool:
        return a < b if self.goal == "minimize" else a > b


def load_spec(path: str, overrides: List[str] = ()) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"sweep: no sweep file {path!r}; give a W&B sweep YAML (see sweeps/)")
    try:
        config = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"sweep: {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(config, dict):
        raise UserError(f"sweep: {path} must be a mapping with method, metric and parameters")
    if isinstance(config.get("parameters"), dict):
        config = {**config, "parameters": flat_parameters(config["parameters"])}
    return SweepSpec(p, config, list(overrides))


def flat_parameters(parameters: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """W&B's nested parameters (``optim: {parameters: {lr: {...}}}``) as the dotted keys llmexp's
    overrides take (``optim.lr``): they were read as a parameter named optim ("optim=0: unknown optim
    option")."""
    out: Dict[str, Any] = {}
    for key, param in parameters.items():
        nested = isinstance(param, dict) and set(param) == {"parameters"} and isinstance(param["parameters"], dict)
        found = flat_parameters(param["parameters"], f"{prefix}{key}.") if nested else {f"{prefix}{key}": param}
        twice = sorted(set(found) & set(out))
        if twice:  # the later one replaced the earlier, silently
            raise UserError(f"sweep: parameter {twice[0]} is given twice (as {twice[0]} and under "
                            f"{twice[0].rsplit('.', 1)[0]}: parameters:); keep one")
        out.update(found)
    return out


def candidate_values(param: Dict[str, Any]) -> List[Any]:
    """The values of a parameter to check before any trial runs: each of ``values``, or both ends
    of a range (a bad one would otherwise fail its trial hours into the sweep)."""
    if "value" in param:
        return [param["value"]]
    if isinstance(param.get("values"), list) and param["values"]:
        return list(param["values"])
    return [param[k] for k in ("min", "max") if k in param] or [0]


def _meant(unknown: List[Any], known: List[str]) -> List[str]:
    """The keys that typos in ``unknown`` most resemble (a missing one is said by its typo's fix)."""
    import difflib

    return [m for k in unknown for m in difflib.get_close_matches(str(k), known, n=1, cutoff=0.5)]


def _violation_keys(config: Any, schema: Dict[str, Any]) -> Dict[str, str]:
    """Each schema violation's message -> the key it is about (``metric.goal``): the sweeps
    package's messages ("'grdi' is not one of [...]") name no key."""
    import jsonschema

    try:
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(config))
    except Exception:  # noqa: BLE001 - naming the key is a courtesy; the violation is still said
        return {}
    return {e.message: ".".join(str(p) for p in e.absolute_path) for e in errors if e.absolute_path}


def check_spec(spec: SweepSpec) -> None:
    """ConfigError listing every problem: W&B schema violations and keys llmexp does not know."""
    problems: List[Problem] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sweeps package warns about its pydantic config
        import sweeps

        from sweeps.config.schema import sweep_config_jsonschema

        violations = sweeps.schema_violations_from_proposed_config(spec.config)
    known = sorted(sweep_config_jsonschema["properties"])
    unknown = [k for k in spec.config if k not in known]
    for key in unknown:  # a typo: named with the key it resembles (the schema's words for it follow from it)
        problems.append(Problem(f"{spec.path.name}: {key}", "is not a key of a W&B sweep file", suggest(str(key), known)))
    where = _violation_keys(spec.config, sweep_config_jsonschema)
    for v in violations:
        if unknown and ("Additional properties are not allowed" in v or "is a required property" in v):
            continue  # said above, with the fix
        problems.append(Problem(f"{spec.path.name}" + (f": {where[v]}" if where.get(v) else ""), f"W&B sweep schema: {v}",
                                "choose one of the values it lists" if "is not one of" in v else
                                "the keys of a sweep file: https://docs.wandb.ai/guides/sweeps/sweep-config-keys "
                                "(sweeps/*.yaml are examples)"))
    if "metric" not in spec.config and "metric" not in _meant(unknown, known):
        problems.append(Problem(f"{spec.path.name}: metric", "a sweep needs metric.name (and goal)",
                                "metric: {name: val/loss, goal: minimize}"))
    elif isinstance(spec.config.get("metric"), dict) and "name" not in spec.config["metric"]:
        problems.append(Problem(f"{spec.path.name}: metric", "a sweep needs metric.name (and goal)",
                                "metric: {name: val/loss, goal: minimize}"))
    swept = [o.split("=", 1)[0].lstrip("+~") for o in spec.extra
             if o.split("=", 1)[0].lstrip("+~") in (spec.parameters if isinstance(spec.parameters, dict) else {})]
    for key in swept:
        problems.append(Problem(key, f"is swept by {spec.path.name}; an override would set it in every trial",
                                f"leave {key}=... out of the command line, or edit its values in {spec.path.name}"))
    if not spec.parameters and "parameters" not in _meant(unknown, known):
        problems.append(Problem(f"{spec.path.name}: parameters", "no parameters to sweep", "parameters: {optim.lr: ...}"))
    from llmexp.overrides import check_overrides

    params = {k: candidate_values(v) for k, v in (spec.parameters if isinstance(spec.parameters, dict) else {}).items()
              if isinstance(v, dict)}
    # Every candidate value composed at least once: the i-th combination takes each parameter's
    # i-th value (its last once it has no more).
    seen = set()
    from_command_line = {o.split("=", 1)[0].lstrip("+~") for o in spec.extra}
    for i in range(max((len(v) for v in params.values()), default=1)):
        overrides = [*spec.fixed_overrides(), *(f"{k}={v[min(i, len(v) - 1)]}" for k, v in params.items())]
        try:
            check_overrides(overrides)
        except ConfigError as e:
            for p in e.problems:
                if (p.key, p.message) not in seen:
                    seen.add((p.key, p.message))
                    given = "the command line" if p.key in from_command_line else spec.path.name
                    problems.append(Problem(f"{given}: {p.key}", p.message, p.fix))
    if problems:
        raise ConfigError(problems)
