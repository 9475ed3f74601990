"""Online DPO on the shared rollout engine: the preference pairs are the policy's own fresh
samples, judged by the stage's reward (function or reward model), instead of a fixed dataset."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from llmexp import advantages as M
from llmexp.losses import dpo_loss
from llmexp.stages.rollout import Rollout, RolloutStage


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

    def keep_rows(self, r: Rollout) -> Rollout:
        """Each prompt's chosen then rejected response: the reference and the loss run over these
        alone, whatever the group size."""
        k = r.samples_per_prompt
        chosen, rejected, _ = M.preference_pairs(r.scores, k)
        first = torch.arange(0, len(r.scores), k, device=r.scores.device)
        return r.rows(torch.stack([first + chosen, first + rejected], 1).flatten(), samples_per_prompt=2)

    @staticmethod
    def split(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A per-row tensor of kept rows as (chosen, rejected), one entry per prompt each."""
        return x[0::2], x[1::2]

    def counted_pairs(self, r: Rollout) -> torch.Tensor:
        """Per pair, 1 if the loss counts it (stage.skip_ties leaves ties out), else 0."""
        chosen, rejected = self.split(r.scores)
        return (chosen != rejected).float() if self.cfg.stage.skip_ties else torch.ones_like(chosen)

    def finish(self, rollouts: List[Rollout]) -> Dict[str, float]:
        margins = torch.cat([torch.sub(*self.split(r.scores)) for r in rollouts])
        return {"ties": float((margins == 0).float().mean()), "score_margin": float(margins.mean())}

    def loss_denominators(self, group: List[Rollout]) -> List[float]:
        """The pairs the update counts, over every rank (so ddp equals one process)."""
        return [self.per_rank_share(float(sum(self.counted_pairs(r).sum() for r in group)))] * len(group)

    def metric_units(self, r: Rollout) -> float:
        return float(len(r.scores) // 2)  # metrics are means over pairs

    def pair_outputs(self, r: Rollout) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every kept row's token log-probs and entropies. The pairs the loss leaves out (ties,
        with stage.skip_ties) run without recording a gradient, for their metrics alone: a third
        of the cost, and ~2/3 of the pairs tie on a 0/1 reward. At least one pair keeps its
        gradient, so every rank runs a backward pass."""
        counted = self.counted_pairs(r).bool()
        if not counted.any():
            counted[0] = True
        if counted.all():
            return self.token_outputs(r, self.model)[::2]
        learn, idle = (torch.stack([2 * p, 2 * p + 1], 1).flatten() for p in (counted.nonzero().squeeze(1),
                                                                              (~counted).nonzero().squeeze(1)))
        logprobs, _, entropy = self.token_outputs(r.rows(learn, 2), self.model)
        with torch.no_grad():
            idle_logprobs, _, idle_entropy = self.token_outputs(r.rows(idle, 2), self.model)
        whole = lambda a, b: a.new_zeros(r.mask.shape).index_copy(0, learn, a).index_copy(0, idle, b)  # noqa: E731
        return whole(logprobs, idle_logprobs), whole(entropy, idle_entropy)

    def rollout_loss(self, r: Rollout):
        s = self.cfg.stage
        logprobs, entropy = self.pair_outputs(r)
        m = r.mask
        policy, ref, tokens = (logprobs * m).sum(1), (r.ref_logprobs * m).sum(1), m.sum(1)
        (pc, pr), (rc, rr), (tc, tr) = self.split(policy), self.split(ref), self.split(tokens)
        losses = dpo_loss(pc, pr, rc, rr, beta=s.beta, loss_type=s.loss_type, label_smoothing=s.label_smoothing,
                          chosen_tokens=tc, rejected_tokens=tr, discopop_tau=s.discopop_tau)
        if s.rpo_alpha:
            losses = losses - s.rpo_alpha * pc / tc.clamp(min=1)
        with torch.no_grad():
            margin = s.beta * ((pc - rc) - (pr - rr))
            entropy = (entropy * m).sum(1) / tokens.clamp(min=1)
            extras = {"margin": margin.sum(), "accuracy": (margin > 0).float().sum(),
                      "kl": ((policy - ref) / 2).sum(),  # per response
                      "entropy": (entropy / 2).sum()}  # per token of each response, averaged over responses
        return (losses * self.counted_pairs(r)).sum(), extras
