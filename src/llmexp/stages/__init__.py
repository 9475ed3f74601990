"""Stage name -> LightningModule class, imported only when a run starts."""

from __future__ import annotations

import importlib

STAGES = {
    "pretrain": "llmexp.stages.causal_lm:PretrainStage",
    "sft": "llmexp.stages.causal_lm:SFTStage",
    "rm": "llmexp.stages.preference:RewardModelStage",
    "dpo": "llmexp.stages.preference:DPOStage",
    "ppo": "llmexp.stages.policy_gradient:PPOStage",
    "grpo": "llmexp.stages.policy_gradient:GRPOStage",
}


def stage_class(name: str):
    module, _, cls = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
