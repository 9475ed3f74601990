"""Stage name -> LightningModule class, imported only when a run starts."""

from __future__ import annotations

import importlib

STAGES = {
    "pretrain": "llmexp.stages.causal_lm:PretrainStage",
    "sft": "llmexp.stages.causal_lm:SFTStage",
}


def stage_class(name: str):
    module, _, cls = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
