"""The stage registry: one row per stage, and the only place the rest of llmexp asks what a stage
is (its class, config schema, data formats, model head, whether it packs or generates).

Imports no torch: the config check, the CLI and the docs read it before anything heavy starts.
Adding a stage is one module under llmexp/stages/, one conf/stage/<name>.yaml and one row here
(docs/architecture.md has the recipe).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, Tuple

from llmexp.config import schema as S


@dataclass(frozen=True)
class StageSpec:
    name: str
    # "module:Class" of the LightningModule, imported only when a run starts
    cls: str
    # the dataclass that types and defaults the ``stage:`` section
    schema: type
    # data formats it trains on (llmexp.data.formats)
    formats: Tuple[str, ...]
    # "causal_lm" (ends with a language model) or "score" (a one-label sequence classifier)
    head: str = "causal_lm"
    # may pack several rows into one sequence (stages that score whole rows may not)
    packs: bool = False
    # samples responses token by token while training (no sequence parallelism)
    generates: bool = False
    # post-training of a language model: health-guarded, warned about lr scale on big models
    post_training: bool = False
    # trainer.max_steps: "required" (>= 1: the stage trains), "optional" (0 allowed: prune's
    # recovery SFT), "none" (must be 0: quantize changes a trained model without steps)
    steps: str = "required"
    # its train/loss and val/loss are the next-token cross-entropy per token (llmexp compare puts
    # such runs' losses side by side; every other stage's loss is its own objective)
    token_loss: bool = False

    @property
    def changes_a_trained_model(self) -> bool:
        """It starts from model.pretrained and alters it (prune, quantize)."""
        return self.steps != "required"

    @property
    def language_model(self) -> bool:
        """It ends with a language model: the task metric, evals and generate apply."""
        return self.head == "causal_lm"

    def load(self):
        module, _, name = self.cls.partition(":")
        return getattr(importlib.import_module(module), name)


ROLLOUT_FORMATS = ("prompt_only", "preference", "unpaired_preference", "prompt_completion", "chat")

STAGES: Dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("pretrain", "llmexp.stages.causal_lm:PretrainStage", S.PretrainStageConfig,
              ("text", "chat", "prompt_completion"), packs=True, token_loss=True),
    StageSpec("sft", "llmexp.stages.causal_lm:SFTStage", S.SFTStageConfig, ("chat", "prompt_completion"),
              packs=True, token_loss=True),
    StageSpec("rm", "llmexp.stages.preference:RewardModelStage", S.RewardModelStageConfig, ("preference",),
              head="score"),
    StageSpec("dpo", "llmexp.stages.preference:DPOStage", S.DPOStageConfig, ("preference",),
              post_training=True),
    StageSpec("kto", "llmexp.stages.preference:KTOStage", S.KTOStageConfig, ("unpaired_preference", "preference"),
              post_training=True),
    StageSpec("simpo", "llmexp.stages.preference:SimPOStage", S.SimPOStageConfig, ("preference",),
              post_training=True),
    StageSpec("orpo", "llmexp.stages.preference:ORPOStage", S.ORPOStageConfig, ("preference",),
              post_training=True),
    StageSpec("ppo", "llmexp.stages.policy_gradient:PPOStage", S.PPOStageConfig, ROLLOUT_FORMATS,
              generates=True, post_training=True),
    StageSpec("grpo", "llmexp.stages.policy_gradient:GRPOStage", S.GRPOStageConfig, ROLLOUT_FORMATS,
              generates=True, post_training=True),
    StageSpec("rloo", "llmexp.stages.policy_gradient:RLOOStage", S.RLOOStageConfig, ROLLOUT_FORMATS,
              generates=True, post_training=True),
    StageSpec("online_dpo", "llmexp.stages.online_dpo:OnlineDPOStage", S.OnlineDPOStageConfig, ROLLOUT_FORMATS,
              generates=True, post_training=True),
    StageSpec("distill", "llmexp.stages.distill:DistillStage", S.DistillStageConfig, ("chat", "prompt_completion")),
    StageSpec("quantize", "llmexp.stages.quantize:QuantizeStage", S.QuantizeStageConfig, ("chat", "prompt_completion", "text"),
              steps="none", token_loss=True),
    StageSpec("prune", "llmexp.stages.prune:PruneStage", S.PruneStageConfig, ("chat", "prompt_completion", "text"),
              steps="optional", token_loss=True),
)}


def stage_spec(name: str) -> StageSpec:
    return STAGES[name]
