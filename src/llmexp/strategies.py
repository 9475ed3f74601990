"""Lightning strategy objects from config (``strategy=auto`` now; ddp/fsdp/tp/deepspeed follow)."""

from __future__ import annotations

from typing import Any

from llmexp.config.schema import RunConfig


def build_strategy(cfg: RunConfig) -> Any:
    """What Lightning's Trainer(strategy=...) receives for ``cfg.strategy.name``."""
    if cfg.strategy.name == "auto":
        return "auto"
    raise ValueError(f"unknown strategy {cfg.strategy.name!r}")  # validation refuses it earlier
