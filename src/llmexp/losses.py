"""Loss functions as pure functions of tensors, unit-tested against hand-derived values.

Losses return a *sum* and the number of terms it sums, so that a caller can normalise over a
whole optimizer step (all micro-batches, all ranks): that is what makes gradient accumulation
and packing give exactly the loss of one big unpacked batch.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from llmexp.data.encode import IGNORE_INDEX


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token negative log-likelihoods and the number of target tokens.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled -100 carry no loss.
    """
    targets = labels[:, 1:]
    logits = logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (targets != IGNORE_INDEX).sum()


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token, ``[batch, seq-1]``; 0 where the label is -100."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's target tokens, and how many there are."""
    return token_logprobs(logits, labels).sum(-1), (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per-pair ``-log sigmoid(r_chosen - r_rejected - margin)``: the chosen response should
    score at least ``margin`` above the rejected one."""
    return -F.logsigmoid(chosen - rejected - margin)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO losses from summed sequence log-probs of policy and reference.

    sigmoid: ``-(1-e) log s(b d) - e log s(-b d)`` (conservative DPO when e > 0), d the
    difference of the chosen and rejected log-ratios; hinge: ``relu(1 - b d)``; ipo: ``(d' -
    1/(2b))^2`` with d' from per-token (length-averaged) log-ratios, as TRL and the IPO authors
    do; robust: the unbiased noisy-label estimator ``(-(1-e) log s(b d) + e log s(-b d)) / (1-2e)``.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the completion token counts")
        avg = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (avg - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate ``max(-A r, -A clip(r, 1-e, 1+e))``, with the clipped indicator and
    the per-token approximate KL ``(r - 1) - log r`` (Schulman's k3) to the sampling policy."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float(), (ratio - 1) - log_ratio


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_range: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``0.5 max((v - R)^2, (v_clip - R)^2)`` with ``v_clip`` kept within ``clip_range``
    of the rollout's value, and the clipped indicator."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    a, b = (values - returns) ** 2, (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(a, b), (b > a).float()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token unbiased, non-negative KL estimate ``exp(d) - d - 1`` with ``d = logp_ref - logp``."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1
