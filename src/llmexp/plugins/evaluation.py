"""Run a registered eval (built-in or a plugin's) by name: typed options in, checked metrics out.

The adapter between the ``llmexp_evals`` registry and whatever runs evals (llmexp's eval
runner after training, or :func:`evaluate_model_dir` on an exported model).
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from llmexp.errors import ConfigError, Problem, UserError
from llmexp.plugins.declarations import EvalContext
from llmexp.plugins.errors import PluginError
from llmexp.plugins.manager import raised_at
from llmexp.plugins.registry import lookup


def option_problems(name: str, values: Optional[Mapping[str, Any]], key: str) -> Tuple[Any, List[Problem]]:
    """(typed options of eval ``name`` from ``values``, problems under ``key``): an unknown option is
    named with the eval, its plugin, the declared options and the closest one."""
    from llmexp.config.check import check_options

    entry = lookup("llmexp_evals", name, "eval")
    return check_options(dict(values or {}), entry.declaration.options, key, entry.describe("eval"))


def eval_options(name: str, values: Optional[Mapping[str, Any]] = None, key: Optional[str] = None) -> Any:
    """The typed options of eval ``name`` from ``values``, or ConfigError naming ``key``."""
    options, problems = option_problems(name, values, key or f"eval.{name}.options")
    if problems:
        raise ConfigError(problems)
    return options


def run_eval(name: str, model: Any, tokenizer: Any, options: Optional[Mapping[str, Any]] = None,
             run_dir: Optional[Path] = None, cfg: Any = None, key: Optional[str] = None) -> Dict[str, float]:
    """Metrics of eval ``name`` on ``model`` as ``{"<name>/<metric>": float}``; bad ``options`` are a
    ConfigError naming ``key`` (default ``eval.<name>.options``)."""
    entry = lookup("llmexp_evals", name, "eval")
    typed = options if dataclasses.is_dataclass(options) else eval_options(name, options, key)
    ctx = EvalContext(model=model, tokenizer=tokenizer, options=typed, run_dir=run_dir, cfg=cfg)
    try:
        metrics = entry.declaration.runner(ctx)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the plugin's bug: name it and where (LLMEXP_TRACEBACK=1: how)
        raise PluginError([Problem(str(entry.owner), f"eval {name!r} failed: {type(e).__name__}: {e}"
                                   f"{raised_at(e, entry.owner)}",
                                   "fix the eval where it raised (LLMEXP_TRACEBACK=1 shows the traceback), or report "
                                   "it to the plugin's authors")]) from e
    return _checked(name, metrics, entry.owner)


def _checked(name: str, metrics: Any, owner: Any) -> Dict[str, float]:
    bad = None
    if not isinstance(metrics, Mapping):
        bad = f"returned {type(metrics).__name__}, not a mapping of metric name to number"
    else:
        wrong = {k: v for k, v in metrics.items() if not isinstance(k, str) or not isinstance(v, Real)}
        # NaN was recorded, and written into results.json as a bare NaN, which strict JSON readers refuse
        infinite = {k: v for k, v in metrics.items() if k not in wrong and not math.isfinite(v)}
        bad = (f"returned non-numeric metrics {wrong}" if wrong
               else f"returned non-finite metrics {infinite}" if infinite else None)
    if bad:
        raise PluginError([Problem(str(owner), f"eval {name!r} {bad}",
                                   "return {'metric': finite number, ...} (leave out a metric it could not measure)")])
    return {f"{name}/{k}": float(v) for k, v in metrics.items()}  # numpy numbers become plain floats


def evaluate_model_dir(name: str, model_dir: Path, options: Optional[Mapping[str, Any]] = None,
                       run_dir: Optional[Path] = None) -> Dict[str, float]:
    """Run eval ``name`` on an exported model directory (a run's ``model/``)."""
    from llmexp.record import load_language_model

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"model: {model_dir} is not an exported model (no config.json); give a run's model/ dir")
    typed = eval_options(name, options)  # bad options fail before the model loads
    model, tokenizer = load_language_model(model_dir)
    return run_eval(name, model, tokenizer, typed, run_dir=run_dir)
