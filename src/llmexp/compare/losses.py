"""Loss metrics of runs whose losses mean different things (an sft run's cross-entropy per token,
a dpo run's preference loss) named apart, so the table gives them separate columns and the curves
separate panels: under one name a dpo run could look worse than an sft run, or better."""

from __future__ import annotations

from typing import Dict, List, Sequence

from llmexp.plotting import metric_unit

LOSSES = ("train/loss", "val/loss")
CROSS_ENTROPY = "cross-entropy"


def loss_kind(stage: str) -> str:
    """'cross-entropy' for the stages whose loss is the next-token cross-entropy, else the stage."""
    from llmexp.config.stages import STAGES

    spec = STAGES.get(stage)
    return CROSS_ENTROPY if spec is None or spec.token_loss else stage


def loss_names(stages: Sequence[str]) -> List[Dict[str, str]]:
    """For each run, its loss metrics' names in the comparison: ``val/loss (dpo)``, ``val/loss
    (cross-entropy)`` where the runs' losses differ in kind; unchanged (no entries) where they agree."""
    kinds = [loss_kind(s) for s in stages]
    if len(set(kinds)) <= 1:
        return [{} for _ in stages]
    return [{m: f"{m} ({kind})" for m in LOSSES} for kind in kinds]


def renamed(row: Dict[str, float], names: Dict[str, str]) -> Dict[str, float]:
    return {names.get(k, k): v for k, v in row.items()} if names else row


def base_name(name: str) -> str:
    """``val/loss (dpo)`` -> ``val/loss``."""
    return name.split(" (", 1)[0]


def axis_label(name: str) -> str:
    """The axis label of a (possibly qualified) metric: its unit, or which stage's loss it is."""
    base, _, kind = name.partition(" (")
    kind = kind.rstrip(")")
    if not kind:
        return metric_unit(base)
    return f"{base} (cross-entropy, nats / token)" if kind == CROSS_ENTROPY else f"{base} ({kind}'s loss)"
