"""Loss functions as pure functions of tensors, unit-tested against hand-derived values.

Losses return a *sum* and the number of terms it sums, so that a caller can normalise over a
whole optimizer step (all micro-batches, all ranks): that is what makes gradient accumulation
and packing give exactly the loss of one big unpacked batch.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

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


def smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``-(1-e) log s(z) - e log s(-z)``: the logistic loss of a preference logit ``z`` when a
    fraction ``e`` of the labels is assumed flipped (conservative DPO; plain when e = 0)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             discopop_tau: float = 0.05) -> torch.Tensor:
    """Per-pair DPO losses from summed sequence log-probs of policy and reference.

    sigmoid: ``-(1-e) log s(b d) - e log s(-b d)`` (conservative DPO when e > 0), d the
    difference of the chosen and rejected log-ratios; hinge: ``relu(1 - b d)``; ipo: ``(d' -
    1/(2b))^2`` with d' from per-token (length-averaged) log-ratios, as TRL and the IPO authors
    do; robust: the unbiased noisy-label estimator ``(-(1-e) log s(b d) + e log s(-b d)) / (1-2e)``.
    With ``c``, ``r`` the chosen and rejected log-ratios (TRL's DPOTrainer, each loss's paper):
    exo_pair: ``KL(softmax(b [c, r]) || [1-e, e])`` (EXO, needs e > 0); nca_pair: ``-log s(b c) -
    log s(-b c)/2 - log s(-b r)/2``; bco_pair: ``-log s(b c) - log s(-b r)``; sppo_hard: ``(c -
    1/(2b))^2 + (r + 1/(2b))^2``; apo_zero: ``1 - s(b c) + s(b r)`` (raise the chosen, lower the
    rejected); apo_down: ``s(b c) + 1 - s(b d)`` (lower both, the rejected more); discopop: the
    logistic and exponential losses of ``b d`` blended by ``s(b d / tau)``.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return smoothed_sigmoid_loss(beta * delta, label_smoothing)
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
    c, r = beta * chosen_ratio, beta * rejected_ratio
    if loss_type == "exo_pair":
        if not 0 < label_smoothing < 1:
            raise ValueError("exo_pair needs 0 < label_smoothing < 1")
        z = beta * delta
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing)))
    if loss_type == "nca_pair":
        return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(c) - F.logsigmoid(-r)
    if loss_type == "sppo_hard":
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(c) + torch.sigmoid(r)
    if loss_type == "apo_down":
        return torch.sigmoid(c) + 1 - torch.sigmoid(beta * delta)
    if loss_type == "discopop":
        z = beta * delta
        mix = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


def kto_loss(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto") -> torch.Tensor:
    """Per-completion KTO losses (Ethayarajh et al. 2024, Eq. 7; TRL's KTOTrainer) from each
    completion's log-ratio ``log pi - log pi_ref`` and whether it is desirable: ``w_d (1 - s(b (r -
    z)))`` for desirable ones, ``w_u (1 - s(b (z - r)))`` for the others, ``z`` the batch's KL
    estimate (detached, >= 0). apo_zero_unpaired: ``1 - s(b r)`` and ``s(b r)``, no KL."""
    if loss_type == "kto":
        good, bad = 1 - torch.sigmoid(beta * (logratios - kl)), 1 - torch.sigmoid(beta * (kl - logratios))
    elif loss_type == "apo_zero_unpaired":
        good, bad = 1 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios)
    else:
        raise ValueError(f"unknown KTO loss type {loss_type!r}")
    return torch.where(desirable, desirable_weight * good, undesirable_weight * bad)


def average_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Length-normalised sequence log-probs: the summed log-prob over the number of target tokens."""
    return logprobs / tokens.clamp(min=1)


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, *, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO loss (Meng et al. 2024) from length-averaged log-probs, no reference:
    ``-log s(b (avg_c - avg_r) - g)``, the chosen answer's mean token log-prob should beat the
    rejected one's by the target margin ``g / b``; with label smoothing as in conservative DPO
    (TRL's CPOTrainer, ``loss_type="simpo"``)."""
    return smoothed_sigmoid_loss(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-ln 2`` (Maechler 2012);
    ``x`` is capped just below 0 so that a certain answer gives a large finite value, not inf."""
    x = x.clamp(max=-1e-7)
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ORPO odds-ratio term (Hong et al. 2024) ``-log s(log odds_c - log odds_r)`` and
    the log odds ratio, with ``log odds(p) = log p - log(1 - p)`` of the length-averaged log-prob
    ``log p``. ORPO's loss is the chosen answers' NLL plus lambda times this term."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return -F.logsigmoid(log_odds), log_odds


def importance_log_weights(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    """``log pi/pi_old`` per token ([B, T]), or at ``level="sequence"`` (GSPO) the mean over each
    response's tokens ([B, 1]: one ratio for the whole sequence)."""
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance sampling level {level!r}: token or sequence")


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float, clip_range_high: Optional[float] = None, level: str = "token",
                        mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate ``max(-A r, -A clip(r, 1-e, 1+e_high))`` (``e_high``: DAPO's
    clip-higher, default ``e``), with the clipped indicator and the per-token approximate KL
    ``(r - 1) - log r`` (Schulman's k3) to the sampling policy. ``level="sequence"`` uses one
    ratio per response (GSPO; needs ``mask``)."""
    if mask is None:
        mask = torch.ones_like(logprobs)
    log_weights = importance_log_weights(logprobs, old_logprobs, mask, level)
    ratio = torch.exp(log_weights)
    high = clip_range if clip_range_high is None else clip_range_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = torch.maximum(unclipped, clipped).expand_as(logprobs)
    log_ratio = logprobs - old_logprobs
    return loss, (clipped > unclipped).float().expand_as(logprobs), torch.exp(log_ratio) - 1 - log_ratio


def sequence_clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                                 mask: torch.Tensor, clip_range: float, clip_range_high: Optional[float] = None
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """RLOO's per-response surrogate ``max(-A r, -A clip(r, 1-e, 1+e_high))`` with one ratio per
    response, ``r = exp(sum_t log pi/pi_old)`` (the response's probability ratio, not GSPO's
    per-token mean), and the clipped indicator; ``advantages`` is one per response ([B])."""
    ratio = torch.exp(((logprobs - old_logprobs) * mask).sum(-1))
    high = clip_range if clip_range_high is None else clip_range_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def policy_loss_sum(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The numerator of ``loss_type``: the sum of per-response token means (grpo) or of the
    masked tokens (bnpo, dr_grpo, dapo); policy_loss_units gives what it is divided by."""
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    return (per_token * mask).sum()


def policy_loss_units(mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> float:
    """What one micro-batch adds to the denominator of ``loss_type``: responses (grpo), tokens
    (bnpo, dapo) or responses x max_new_tokens (dr_grpo); a response with no counted token (left
    out of the update) adds nothing."""
    responses = float((mask.sum(-1) > 0).sum())
    if loss_type == "grpo":
        return responses
    if loss_type == "dr_grpo":
        return responses * max_new_tokens
    return float(mask.sum())


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


def distillation_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                            temperature: float = 1.0) -> torch.Tensor:
    """Per-position generalised Jensen-Shannon divergence between the teacher's and the student's
    next-token distributions (GKD, Agarwal et al. 2024, eq. 1; TRL's generalized_jsd_loss), both
    softened by ``temperature``. ``beta`` 0 is the forward KL(teacher || student) of classic
    distillation (mass-covering), 1 the reverse KL(student || teacher) (mode-seeking), between
    them the KLs of each to the mixture ``beta * teacher + (1 - beta) * student``."""
    s = torch.log_softmax(student_logits.float() / temperature, -1)
    t = torch.log_softmax(teacher_logits.float() / temperature, -1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    mix = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), 0)
    return beta * (t.exp() * (t - mix)).sum(-1) + (1 - beta) * (s.exp() * (s - mix)).sum(-1)


def paired_layers(student_layers: int, teacher_layers: int) -> List[Tuple[int, int]]:
    """(student layer, teacher layer) pairs of attention transfer: the student's layers spread
    evenly over the teacher's, first with first and last with last; a one-layer student takes the
    teacher's first layer (measured on the bundled skill: 0.92 exact match, 0.76 with the last)."""
    if student_layers == 1:
        return [(0, 0)]
    return [(i, int(i * (teacher_layers - 1) / (student_layers - 1) + 0.5)) for i in range(student_layers)]


def attention_divergence(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                         query_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) between the attention distributions of paired layers
    (``paired_layers``), averaged over heads and layers for each query position where
    ``query_mask`` [batch, seq] is true: (its sum over those positions, their number), so that
    means over several batches are exact (attention transfer: MiniLM, Wang et al. 2020;
    TinyBERT). Each map is [batch, heads, seq, seq]; when the head counts differ, the
    head-averaged maps are compared."""
    pairs = paired_layers(len(student), len(teacher))
    per_query = torch.zeros(query_mask.shape, device=query_mask.device)
    for i, j in pairs:
        s, t = student[i].float(), teacher[j].float()
        if s.size(1) != t.size(1):
            s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
        kl = torch.xlogy(t, t) - t * s.clamp_min(1e-12).log()
        per_query = per_query + kl.sum(-1).mean(1)
    return (per_query / len(pairs))[query_mask].sum(), query_mask.sum()
