"""What every llmexp plot shares: Agg figures saved atomically, values written the way people
write them (``3e-4``), a log axis where values span decades, and units on metric axes."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

# Sweep distributions whose values are spread on a log scale (W&B's names).
LOG_DISTRIBUTIONS = {"log_uniform", "log_uniform_values", "q_log_uniform", "q_log_uniform_values",
                     "inv_log_uniform", "inv_log_uniform_values"}


def short(value: Any) -> str:
    """``3e-4`` rather than ``0.0003`` or ``0.00030000000000000003``: labels a person reads."""
    if hasattr(value, "item"):
        value = value.item()
    if value is None:  # as an override writes it (pretrained=null)
        return "null"
    if isinstance(value, str) and "/" in value and len(value) > 24:  # a path: its last two parts
        return "…/" + "/".join(Path(value).parts[-2:])
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value != 0 and math.isfinite(value) and (abs(value) < 1e-2 or abs(value) >= 1e4):
        mantissa, exponent = f"{value:.2e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.3g}"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def log_scale(values: Iterable[Any], distribution: Optional[str] = None) -> bool:
    """A log axis when the parameter was drawn log-uniformly, or its positive values span more
    than a decade (learning rates, betas of several orders): a linear axis would crush them."""
    if distribution in LOG_DISTRIBUTIONS:
        return True
    numbers = [float(v) for v in values if is_number(v)]
    if not numbers or min(numbers) <= 0:
        return False
    return max(numbers) / min(numbers) > 10


def metric_unit(name: str) -> str:
    """The axis label of a logged metric with its unit, so a plot reads without the code."""
    leaf = name.rsplit("/", 1)[-1]
    if "loss" in leaf:
        return f"{name} (nats / token)" if name.endswith(("val/loss", "train/loss")) else f"{name} (loss)"
    units = {"perplexity": "(per token)", "task_score": "(fraction correct)", "accuracy": "(fraction)",
             "exact_match": "(fraction)", "acc": "(fraction)", "reward": "(mean reward)", "kl": "(nats)",
             "lr": "(learning rate)", "tokens_per_second": "(tokens / s)", "response_length": "(tokens)",
             "task_response_chars": "(characters)", "grad_norm": "(L2 norm)", "entropy": "(nats)"}
    return f"{name} {units[leaf]}" if leaf in units else name


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display here, and none needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (a reader never sees half an image) and close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    pyplot().close(fig)
    os.replace(tmp, path)
    return path


def describe(values: dict, keys: Optional[Iterable[str]] = None) -> str:
    """``lr=3e-4, beta=0.1``: a run named by its settings, each key by its last part when that is
    unambiguous among ``keys`` (``optim.lr`` -> ``lr``); a config group's choice by the group
    (``stage.name`` -> ``stage``)."""
    keys = list(values if keys is None else keys)
    leaves = [k.split(".")[0] if k.endswith(".name") and k.count(".") == 1 else k.rsplit(".", 1)[-1] for k in keys]
    names = {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(keys, leaves)}
    return ", ".join(f"{names[k]}={short(values.get(k))}" for k in keys)
