"""Online DPO on the shared rollout engine: the preference pairs are the policy's own fresh
samples, judged by the stage's reward (function or reward model), instead of a fixed dataset."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from llmexp import advantages as M
from llmexp.losses import dpo_loss
from llmexp.stages.rollout import Rollout, RolloutStage


def _pick(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """From ``x`` of shape ``[prompts, group]``, each prompt's entry at ``offset``."""
    return x.gather(1, offset.unsqueeze(1)).squeeze(1)


class OnlineDPOStage(RolloutStage):
    """Online DPO (Guo et al. 2024, TRL's OnlineDPOTrainer): ``group_size`` responses sampled per
    prompt, the highest-scored chosen and the lowest rejected, and dpo's loss of the pair against
    the frozen starting policy, averaged over the pairs of every rank. One update per rollout."""

    @property
    def samples_per_prompt(self) -> int:
        return self.cfg.stage.group_size

    @staticmethod
    def uses_reference(cfg) -> bool:
        return True  # DPO's log-ratios are to the reference

    def needs_old_logprobs(self) -> bool:
        return False  # one update per rollout: no ratio to the sampling policy

    @property
    def logprob_temperature(self) -> float:
        # DPO's implicit reward is the model's own log-ratio; the sampling temperature only shapes
        # which responses are drawn (TRL takes the log-probs at 1 too).
        return 1.0

    def pairs(self, r: Rollout) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per prompt: the chosen and rejected offsets in its group, and 1 if the loss counts
        the pair (stage.skip_ties leaves ties out), else 0."""
        chosen, rejected, decided = M.preference_pairs(r.scores, self.samples_per_prompt)
        counted = decided.float() if self.cfg.stage.skip_ties else torch.ones_like(decided, dtype=torch.float)
        return chosen, rejected, counted

    def finish(self, rollouts: List[Rollout]) -> Dict[str, float]:
        decided, margins = [], []
        for r in rollouts:
            chosen, rejected, d = M.preference_pairs(r.scores, self.samples_per_prompt)
            grouped = r.scores.view(-1, self.samples_per_prompt)
            decided.append(d.float())
            margins.append(_pick(grouped, chosen) - _pick(grouped, rejected))
        return {"ties": float(1 - torch.cat(decided).mean()), "score_margin": float(torch.cat(margins).mean())}

    def loss_denominators(self, group: List[Rollout]) -> List[float]:
        """The pairs the update counts, over every rank (so ddp equals one process)."""
        return [self.per_rank_share(float(sum(self.pairs(r)[2].sum() for r in group)))] * len(group)

    def metric_units(self, r: Rollout) -> float:
        return float(r.scores.numel() // self.samples_per_prompt)  # metrics are means over prompts

    def rollout_loss(self, r: Rollout):
        s, k = self.cfg.stage, self.samples_per_prompt
        logprobs, _, entropy = self.token_outputs(r, self.model)
        m = r.mask
        policy, ref = (logprobs * m).sum(1).view(-1, k), (r.ref_logprobs * m).sum(1).view(-1, k)
        tokens = m.sum(1).view(-1, k)
        chosen, rejected, counted = self.pairs(r)
        losses = dpo_loss(_pick(policy, chosen), _pick(policy, rejected), _pick(ref, chosen), _pick(ref, rejected),
                          beta=s.beta, loss_type=s.loss_type, label_smoothing=s.label_smoothing,
                          chosen_tokens=_pick(tokens, chosen), rejected_tokens=_pick(tokens, rejected),
                          discopop_tau=s.discopop_tau)
        if s.rpo_alpha:
            losses = losses - s.rpo_alpha * _pick(policy, chosen) / _pick(tokens, chosen).clamp(min=1)
        with torch.no_grad():
            ratio = policy - ref
            margin = s.beta * (_pick(ratio, chosen) - _pick(ratio, rejected))
            extras = {"margin": margin.sum(), "accuracy": (margin > 0).float().sum(),
                      "kl": ratio.mean(1).sum(),  # per response, averaged within each group
                      "entropy": ((entropy * m).sum(1).view(-1, k) / tokens.clamp(min=1)).mean(1).sum()}
        return (losses * counted).sum(), extras
