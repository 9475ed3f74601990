"""Preference stages: a Bradley-Terry reward model (rm), direct preference optimisation (dpo),
kto, and the reference-free simpo and orpo.

rm, dpo, simpo and orpo train on prompt/chosen/rejected pairs, collated as one batch of chosen
rows followed by rejected rows; with ``stage.share_prompt`` each pair's prompt runs once for both
answers (llmexp.prompt_sharing), else the rows run whole. The loss weight is the number of pairs. kto trains on completions labelled desirable or not; its loss weight is the
number of completions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from llmexp.data.collate import collate_preference, collate_unpaired
from llmexp.data.encode import preference_encoder, unpaired_encoder
from llmexp.losses import (average_logprobs, bradley_terry_loss, dpo_loss, kto_loss, odds_ratio_loss,
                           sequence_logprobs, simpo_loss)
from llmexp.prompt_sharing import SharedPairs, pair_logits, pair_scores, share_pairs
from llmexp.stages.base import StageModule
from llmexp.stages.reference import Reference

MODEL_KEYS = ("input_ids", "attention_mask")


class PreferenceStage(StageModule):

    def encoder(self, fmt: str):
        return preference_encoder(self.tokenizer)

    def collate(self, rows):
        return collate_preference(rows, self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def pair_sums(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Per-pair tensors of this stage: ``loss`` and the pair metrics, each of shape [pairs]."""
        raise NotImplementedError

    def shared_pairs(self, model, batch: Dict[str, Any]) -> Optional[SharedPairs]:
        """The batch as prompts and answers when ``stage.share_prompt`` is on and the model and
        the batch allow it (None: run the rows whole)."""
        if not getattr(self.cfg.stage, "share_prompt", False) or not self.can_share_prefixes(model):
            return None
        return share_pairs(batch["input_ids"], batch["attention_mask"], batch["labels"], self.tokenizer.pad_token_id)

    def row_logprobs(self, model, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each row's summed answer log-prob under ``model`` and its number of answer tokens."""
        shared = self.shared_pairs(model, batch)
        if shared is not None:
            return sequence_logprobs(*pair_logits(model, shared))
        return sequence_logprobs(model(**{k: batch[k] for k in MODEL_KEYS}, use_cache=False).logits, batch["labels"])

    def micro_loss(self, batch):
        terms = self.pair_sums(batch)
        extras = {k: v.detach().sum() for k, v in terms.items() if k != "loss"}
        return terms["loss"].sum(), extras

    def val_sums(self, batch):
        n = batch["loss_weight"]
        return {k: (v.detach().sum(), n) for k, v in self.pair_sums(batch).items()}


class RewardModelStage(PreferenceStage):
    """A one-label sequence classifier scoring prompt+response, trained so that the chosen
    response scores above the rejected one (pairwise Bradley-Terry loss, optional margin)."""

    @classmethod
    def create(cls, cfg, tokenizer):
        from llmexp.models.build import build_model
        from llmexp.models.peft import apply_peft, quantization_config

        model = build_model(cfg.model, tokenizer, quantization_config(cfg.peft), head="score")
        return cls(cfg, apply_peft(model, cfg.peft, cfg.model, task_type="SEQ_CLS"), tokenizer)

    def row_scores(self, batch: Dict[str, Any]) -> torch.Tensor:
        shared = self.shared_pairs(self.model, batch)
        scores = pair_scores(self.model, shared) if shared is not None else None
        if scores is None:
            scores = self.model(**{k: batch[k] for k in MODEL_KEYS}, use_cache=False).logits
        return scores[:, 0].float()

    def pair_sums(self, batch):
        chosen, rejected = self.row_scores(batch).chunk(2)
        loss = bradley_terry_loss(chosen, rejected, self.cfg.stage.margin)
        if self.cfg.stage.center_rewards_coefficient:
            loss = loss + self.cfg.stage.center_rewards_coefficient * (chosen + rejected) ** 2
        return {"loss": loss, "accuracy": (chosen > rejected).float(), "margin": chosen - rejected,
                "score_chosen": chosen, "score_rejected": rejected}

    def export(self, out_dir):
        facts = super().export(out_dir)
        norm = score_normalization(self.last_val_metrics)
        if self.trainer.is_global_zero:
            keep_score_scale(out_dir, self.last_val_metrics)
        return {**facts, "reward_model_dir": str(out_dir), **({"score_normalization": norm} if norm else {})}


def keep_score_scale(out_dir, val_metrics: Dict[str, float]) -> Dict[str, float]:
    """Write the score normalization the validation ``val_metrics`` measured (and its held-out
    accuracy) into the exported reward model's config.json; return the normalization."""
    norm = score_normalization(val_metrics)
    accuracy = val_metrics.get("val/accuracy")
    if norm:
        config = Path(out_dir) / "config.json"
        kept = {**norm, **({"llmexp_heldout_accuracy": accuracy} if accuracy is not None else {})}
        config.write_text(json.dumps({**json.loads(config.read_text()), **kept}, indent=2) + "\n")
    return norm


def score_normalization(val_metrics: Dict[str, float]) -> Dict[str, float]:
    """The center and scale that map the held-out mean chosen score to +1 and the mean rejected
    score to -1 (saved with the reward model; ppo/grpo apply them, see RewardConfig.normalize).

    A Bradley-Terry model's scores have an arbitrary offset and a scale that grows with training
    (±10 is common); fed raw to PPO they swamp the KL penalty and the critic's baseline."""
    chosen, rejected = val_metrics.get("val/score_chosen"), val_metrics.get("val/score_rejected")
    if chosen is None or rejected is None or not chosen > rejected:
        return {}
    return {"llmexp_score_center": (chosen + rejected) / 2, "llmexp_score_scale": (chosen - rejected) / 2}


class DPOStage(PreferenceStage):
    """Direct preference optimisation against a frozen reference (a copy, the LoRA base with the
    adapter disabled, or log-probs precomputed once before training)."""

    @classmethod
    def create(cls, cfg, tokenizer):
        from llmexp.errors import UserError
        from llmexp.models.build import build_model
        from llmexp.models.peft import apply_peft, quantization_config

        model = build_model(cfg.model, tokenizer, quantization_config(cfg.peft))
        use_adapter_base = cfg.peft.name != "none" and cfg.stage.reference != "copy"
        if cfg.stage.reference == "adapter_disabled" and cfg.peft.name == "none":
            raise UserError("stage.reference=adapter_disabled needs LoRA (peft=lora): without an adapter there "
                            "is no base model to fall back to; use stage.reference=copy or precomputed")
        ref = Reference.of(model, keep_copy=not use_adapter_base)
        stage = cls(cfg, apply_peft(model, cfg.peft, cfg.model), tokenizer)
        stage._frozen = {"reference": ref}
        return stage

    # -- the reference ---------------------------------------------------------------------------
    @property
    def reference(self):
        """The frozen copy, or None (the adapter-disabled policy, or freed after precomputing)."""
        return self._frozen["reference"].copy

    def on_fit_start(self) -> None:
        self._frozen["reference"].place(self.model)

    def on_validation_start(self) -> None:
        self._frozen["reference"].place(self.model)

    @torch.no_grad()
    def reference_logprobs(self, batch: Dict[str, Any]) -> torch.Tensor:
        if "ref_logprobs" in batch:
            return batch["ref_logprobs"].to(batch["input_ids"].device)
        with self._frozen["reference"].model(self.model) as reference:
            return self.row_logprobs(reference, batch)[0]

    def setup(self, stage: str) -> None:
        """stage.reference=precomputed: one pass of the reference over every pair, then free it."""
        if self.cfg.stage.reference != "precomputed" or getattr(self, "_precomputed", False):
            return
        dm = self.trainer.datamodule
        device = self.trainer.strategy.root_device  # setup runs before Lightning moves the module
        self.model.to(device)
        self._frozen["reference"].place(self.model)
        for rows in (dm.train_rows, dm.val_rows):
            self._attach_reference_logprobs(rows, device)
        self._precomputed = True
        self._frozen["reference"].free()

    def _attach_reference_logprobs(self, rows: List[Dict[str, Any]], device) -> None:
        size = self.cfg.trainer.val_batch_size
        for chunk in _chunks(rows, size):
            batch = self.collate(chunk)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if self.reference is None:
                was = self.model.training
                self.model.eval()
                logprobs = self.reference_logprobs(batch)
                self.model.train(was)
            else:
                logprobs = self.reference_logprobs(batch)
            chosen, rejected = logprobs.float().cpu().chunk(2)
            for row, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                row["ref_chosen_logprobs"], row["ref_rejected_logprobs"] = c, r

    # -- the loss --------------------------------------------------------------------------------
    def pair_sums(self, batch):
        s = self.cfg.stage
        logprobs, tokens = self.row_logprobs(self.model, batch)
        ref = self.reference_logprobs(batch)
        chosen, rejected = logprobs.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=s.beta, loss_type=s.loss_type,
                        label_smoothing=s.label_smoothing, chosen_tokens=chosen_tokens,
                        rejected_tokens=rejected_tokens, discopop_tau=s.discopop_tau)
        nll_chosen = -average_logprobs(chosen, chosen_tokens)
        if s.rpo_alpha:
            loss = loss + s.rpo_alpha * nll_chosen
        return pair_metrics(loss, s.beta * (chosen - ref_chosen), s.beta * (rejected - ref_rejected), chosen,
                            rejected, nll_chosen)


class KTOStage(DPOStage):
    """Kahneman-Tversky optimisation (Ethayarajh et al. 2024; TRL's KTOTrainer): each completion's
    log-ratio to the frozen reference is pushed above (desirable) or below (undesirable) the
    micro-batch's KL estimate, measured on the same completions behind mismatched prompts."""

    def encoder(self, fmt: str):
        return unpaired_encoder(self.tokenizer, fmt)

    def collate(self, rows):
        return collate_unpaired(rows, self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def completion_sums(self, batch) -> Dict[str, torch.Tensor]:
        """Per-completion loss and log-ratio, the desirable mask, and the KL estimate (a scalar)."""
        s = self.cfg.stage
        logits = self.model(**{k: batch[k] for k in MODEL_KEYS}, use_cache=False).logits
        logprobs, _ = sequence_logprobs(logits, batch["labels"])
        logratios = logprobs - self.reference_logprobs(batch)
        kl = torch.zeros((), device=logprobs.device)
        if s.loss_type == "kto":
            mismatched = batch["kl"]
            with torch.no_grad():
                kl_logits = self.model(**{k: mismatched[k] for k in MODEL_KEYS}, use_cache=False).logits
                kl_local = sequence_logprobs(kl_logits, mismatched["labels"])[0] - self.reference_logprobs(mismatched)
            n = kl_local.numel()
            kl = torch.tensor(self._global_sum(float(kl_local.sum())) / max(self._global_sum(n), 1.0),
                              device=logprobs.device).clamp(min=0)
        desirable = batch["desirable"]
        loss = kto_loss(logratios, desirable, kl, beta=s.beta, desirable_weight=s.desirable_weight,
                        undesirable_weight=s.undesirable_weight, loss_type=s.loss_type)
        return {"loss": loss, "logratios": logratios.detach(), "logprobs": logprobs.detach(), "desirable": desirable,
                "kl": kl}

    def _metric_sums(self, t: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """name -> (sum, count): rewards and the chosen log-prob over the completions they concern."""
        beta, d = self.cfg.stage.beta, t["desirable"]
        rewards = beta * t["logratios"]
        n, n_good = d.numel(), d.sum()
        return {"kl": (t["kl"] * n, n),
                # the implicit reward has the label's sign; zero (the model as its reference) is a miss
                "accuracy": (torch.where(d, rewards > 0, rewards < 0).float().sum(), n),
                "reward_desirable": (rewards[d].sum(), n_good), "reward_undesirable": (rewards[~d].sum(), n - n_good),
                "logp_chosen": (t["logprobs"][d].sum(), n_good)}

    def micro_loss(self, batch):
        t = self.completion_sums(batch)
        n = t["loss"].numel()  # the base divides by the completions: scale each mean to a sum over n
        extras = {k: s * n / max(float(c), 1.0) for k, (s, c) in self._metric_sums(t).items()}
        return t["loss"].sum(), extras

    def val_sums(self, batch):
        t = self.completion_sums(batch)
        return {"loss": (t["loss"].detach().sum(), t["loss"].numel()), **self._metric_sums(t)}


def pair_metrics(loss: torch.Tensor, reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                 logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, nll_chosen: torch.Tensor,
                 **extra: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The per-pair loss and the metrics every policy preference stage logs (the health guard reads
    ``logp_chosen``, the summed log-prob; ``accuracy`` counts ties as misses)."""
    reward_chosen, reward_rejected = reward_chosen.detach(), reward_rejected.detach()
    return {"loss": loss, "accuracy": (reward_chosen > reward_rejected).float(),
            "reward_margin": reward_chosen - reward_rejected, "reward_chosen": reward_chosen,
            "reward_rejected": reward_rejected, "logp_chosen": logp_chosen.detach(),
            "logp_rejected": logp_rejected.detach(), "nll_chosen": nll_chosen.detach(),
            **{k: v.detach() for k, v in extra.items()}}


class ReferenceFreeStage(PreferenceStage):
    """simpo and orpo: one forward pass over the pairs and a loss of the length-averaged log-probs
    (no reference model); the rewards are ``beta`` times those averages, as TRL logs them."""

    def pair_sums(self, batch):
        logprobs, tokens = self.row_logprobs(self.model, batch)
        chosen, rejected = logprobs.chunk(2)
        chosen_avg, rejected_avg = average_logprobs(logprobs, tokens).chunk(2)
        loss, extra = self.pair_loss(chosen_avg, rejected_avg)
        beta = self.cfg.stage.beta
        return pair_metrics(loss, beta * chosen_avg, beta * rejected_avg, chosen, rejected, -chosen_avg, **extra)

    def pair_loss(self, chosen_avg: torch.Tensor, rejected_avg: torch.Tensor):
        """The per-pair loss and any extra per-pair metrics."""
        raise NotImplementedError


class SimPOStage(ReferenceFreeStage):
    """SimPO: ``-log s(beta (avg_c - avg_r) - gamma)``, plus ``cpo_alpha`` times the chosen answers'
    mean token NLL when set (CPO-SimPO)."""

    def pair_loss(self, chosen_avg, rejected_avg):
        s = self.cfg.stage
        loss = simpo_loss(chosen_avg, rejected_avg, beta=s.beta, gamma=s.gamma, label_smoothing=s.label_smoothing)
        if s.cpo_alpha:
            loss = loss - s.cpo_alpha * chosen_avg
        return loss, {}


class ORPOStage(ReferenceFreeStage):
    """ORPO: the chosen answers' mean token NLL plus ``beta`` (the paper's lambda) times
    ``-log s(log odds_c - log odds_r)``."""

    def pair_loss(self, chosen_avg, rejected_avg):
        odds_loss, log_odds = odds_ratio_loss(chosen_avg, rejected_avg)
        return -chosen_avg + self.cfg.stage.beta * odds_loss, {"log_odds_ratio": log_odds}


def _chunks(rows: List[Any], size: int) -> Iterable[List[Any]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]
