"""Lightning strategy objects from config.

ddp: Lightning's DDPStrategy. Each rank takes its own windows of samples (llmexp's WindowSampler),
and the loss is normalised by the global number of loss tokens, so N ranks compute exactly the
step a single process computes on the same global batch.
"""

from __future__ import annotations

from typing import Any

from llmexp.config.schema import RunConfig


def build_strategy(cfg: RunConfig) -> Any:
    """What Lightning's Trainer(strategy=...) receives for ``cfg.strategy.name``."""
    s = cfg.strategy
    if s.name == "auto":
        return "auto"
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=s.backend, find_unused_parameters=s.find_unused_parameters)
    raise ValueError(f"strategy {s.name!r} is not available yet")  # validation refuses it earlier
