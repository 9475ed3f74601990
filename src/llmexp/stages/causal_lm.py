"""Causal-LM stages: pretraining (loss on every token) and SFT (loss on assistant/completion tokens).

They share the model call and the loss; they differ only in the data they accept and how labels
are masked, which the data encoders decide.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import torch

from llmexp.data.collate import collate_lm
from llmexp.data.encode import lm_encoder
from llmexp.losses import token_nll_sum
from llmexp.stages.base import StageModule


class CausalLMStage(StageModule):
    loss_on_targets_only = False

    def encoder(self, fmt: str):
        return lm_encoder(fmt, self.tokenizer, self.loss_on_targets_only)

    def collate(self, rows):
        return collate_lm(rows, self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def _nll(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = self.model(**inputs, use_cache=False).logits
        return token_nll_sum(logits, batch["labels"])

    def micro_loss(self, batch):
        nll, _ = self._nll(batch)
        return nll, {}

    def val_sums(self, batch):
        nll, count = self._nll(batch)
        return {"loss": (nll, count)}

    def derived_metrics(self, means):
        return {"perplexity": math.exp(min(means["loss"], 50.0))}


class PretrainStage(CausalLMStage):
    """Next-token prediction on every token; chat and prompt/completion data are rendered whole."""


class SFTStage(CausalLMStage):
    """Supervised fine-tuning: only assistant / completion tokens count in the loss; with
    stage.neftune_noise_alpha, noisy input embeddings while training (NEFTune)."""

    _neftune = None

    def on_fit_start(self) -> None:
        alpha = self.cfg.stage.neftune_noise_alpha
        if alpha:  # the hook adds noise in training mode only: validation and generation see none
            from transformers.integrations.neftune import activate_neftune

            self._neftune = activate_neftune(self.model, alpha)

    def on_fit_end(self) -> None:
        if self._neftune is not None:
            from transformers.integrations.neftune import deactivate_neftune

            deactivate_neftune(self.model, self._neftune)
            self._neftune = None

    @property
    def loss_on_targets_only(self) -> bool:  # type: ignore[override]
        return self.cfg.stage.assistant_only_loss
