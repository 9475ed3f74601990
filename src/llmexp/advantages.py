"""Advantages for PPO and GRPO as pure functions of tensors, unit-tested against hand-derived values
(their losses live with the others in :mod:`llmexp.losses`).

Shapes: ``[batch, response_len]`` per-token tensors with a 0/1 ``mask`` of real response tokens
(positions after the first eos, and padding, are 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean (unless ``shift_mean`` is False), unit variance over the masked entries."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def masked_whiten_across(xs: List[torch.Tensor], masks: List[torch.Tensor], shift_mean: bool = True
                         ) -> List[torch.Tensor]:
    """``masked_whiten`` with one mean and variance over several micro-batches of different widths."""
    width = max(x.shape[1] for x in xs)
    x = torch.cat([F.pad(x, (0, width - x.shape[1])) for x in xs])
    mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks])
    rows = torch.cumsum(torch.tensor([0] + [len(m) for m in masks]), 0).tolist()
    out = masked_whiten(x, mask, shift_mean)
    return [out[a:b, : m.shape[1]] for a, b, m in zip(rows, rows[1:], masks)]


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for every response token up to and including the first eos, 0 after it (where samplers
    pad). A pad token the policy sampled before eos is part of the response: the loss must see
    the context the token was sampled in."""
    is_eos = (responses == eos_id).long()
    return ((torch.cumsum(is_eos, dim=1) - is_eos) == 0).float()


def kl_penalised_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-kl_coef * (logp - logp_ref)`` with each sequence's score added on its
    last response token; also returns the per-token KL estimate."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: (advantages, returns). The value after the last real
    token is 0 (the episode ends)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO: each reward minus its group's mean (consecutive ``group_size`` rows are one prompt's
    samples), divided by the group's std when ``scale``."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def groups_without_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group (consecutive rows), whether all its responses scored the same: a group-relative
    advantage is then zero for each of them."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(1)


def groups_with_advantage(advantages: torch.Tensor, group_size: int) -> torch.Tensor:
    """Indices of the rows of every group (consecutive ``group_size`` rows) with a nonzero advantage
    on some token, or of the first group if none has one: rows whose advantage is zero throughout
    add nothing to a policy-gradient loss without a KL term, and one group keeps a backward pass
    on every rank."""
    moves = (advantages != 0).reshape(-1, group_size * advantages[0].numel()).any(1)
    if not moves.any():
        moves[0] = True
    return moves.repeat_interleave(group_size).nonzero().squeeze(1)


def sampled_group_weights(without_signal: torch.Tensor, share: float) -> torch.Tensor:
    """Per group, its weight in a KL term estimated from a random share of the groups that scored
    alike: 1 for a group with a signal; for one without, ``1 / share`` with probability ``share``,
    else 0. Any sum over the groups of terms weighted so is, over the draw, the plain sum."""
    drawn = (torch.rand(len(without_signal)) < share).to(without_signal.device)
    return torch.where(without_signal, drawn.float() / share, torch.ones_like(drawn, dtype=torch.float))


def weighted_rows(row_weights: torch.Tensor, group_size: int) -> torch.Tensor:
    """Indices of the rows with a nonzero weight (whole groups), or of the first group if none has
    one (weighted 0, it keeps a backward pass on every rank)."""
    kept = row_weights.reshape(-1, group_size)[:, 0] != 0
    if not kept.any():
        kept[0] = True
    return kept.repeat_interleave(group_size).nonzero().squeeze(1)


def preference_pairs(scores: torch.Tensor, group_size: int = 2) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online DPO: each prompt's responses (``group_size`` consecutive rows) become one preference
    pair, the first highest-scored response chosen and the last lowest-scored one rejected (of two
    tied responses the first is chosen, as TRL's OnlineDPOTrainer). Returns the offsets of the
    chosen and rejected rows in each group, and whether their scores differ (a tie says nothing
    about which is better)."""
    grouped = scores.view(-1, group_size)
    chosen = grouped.argmax(1)
    rejected = group_size - 1 - grouped.flip(1).argmin(1)
    return chosen, rejected, grouped.max(1).values != grouped.min(1).values


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each reward minus the mean of the other ``group_size - 1`` rewards of its prompt
    (consecutive rows are one prompt's samples), an unbiased baseline that needs no critic."""
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-response KL estimate to the reference, ``sum_t (log p - log p_ref)`` over the response's
    tokens (k1, as RLOO subtracts it from the reward; can be negative for one response)."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution whose log-probabilities are ``logp``
    (the log_softmax a caller already has for its token log-probs)."""
    return -(logp.exp() * logp).sum(-1)


@dataclass
class KLController:
    """The KL coefficient: fixed, or adapted (Ziegler et al. 2019) so the KL approaches ``target``."""

    value: float
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    def update(self, current_kl: float, n_samples: int) -> None:
        if not self.adaptive:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
