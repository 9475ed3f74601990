"""Loss functions as pure functions of tensors, unit-tested against hand-derived values.

Losses return a *sum* and the number of terms it sums, so that a caller can normalise over a
whole optimizer step (all micro-batches, all ranks): that is what makes gradient accumulation
and packing give exactly the loss of one big unpacked batch.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token negative log-likelihoods and the number of target tokens.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled -100 carry no loss.
    """
    targets = labels[:, 1:]
    logits = logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (targets != IGNORE_INDEX).sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over target tokens (0 when there are none)."""
    total, count = token_nll_sum(logits, labels)
    return total / count.clamp(min=1)
