"""Each preference pair's prompt run once for both of its answers.

A pair batch (``collate_preference``: the chosen rows, then the rejected rows) holds every prompt
twice. Run whole, each prompt token is computed twice, forward and backward. Here the prompts run
once, their keys and values (with their gradient) are repeated to the pair's two answers, whose
tokens attend to them: the same numbers as the whole rows (tests/test_prompt_sharing.py), for the
cost of one prompt. The rollout stages share a prompt among a group's samples the same way
(``RolloutStage.response_logits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

IGNORE_INDEX = -100


@dataclass
class SharedPairs:
    """A pair batch as its prompts (left-padded, one per pair) and its answers (right-padded, the
    pair's two answers next to each other: chosen 0, rejected 0, chosen 1, ...)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_positions: torch.Tensor
    answer_ids: torch.Tensor
    answer_mask: torch.Tensor
    answer_positions: torch.Tensor
    answer_labels: torch.Tensor
    last_index: torch.Tensor  # per answer row: where its whole row's last non-pad token falls
    batch_order: torch.Tensor  # answer rows -> the batch's row order (chosen block, rejected block)


def share_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                pad_id: int) -> Optional[SharedPairs]:
    """``collate_preference``'s rows as prompts and answers. A row's prompt is its tokens before
    its first target label; None where a pair's two rows do not begin with the same prompt, or a
    row has no answer (run them whole then)."""
    rows, width = input_ids.shape
    n = rows // 2
    if rows == 0 or rows % 2:
        return None
    targets = labels != IGNORE_INDEX
    lengths = attention_mask.sum(1)
    starts = torch.where(targets.any(1), targets.float().argmax(1), lengths)
    chosen, rejected = starts[:n], starts[n:]
    if (starts < 1).any() or (starts >= lengths).any() or not torch.equal(chosen, rejected):
        return None
    columns = torch.arange(width, device=input_ids.device)
    in_prompt = columns[None] < chosen[:, None]
    if not torch.equal(input_ids[:n] * in_prompt, input_ids[n:] * in_prompt):
        return None
    P = int(chosen.max())
    shift = torch.arange(P, device=input_ids.device)[None] - (P - chosen)[:, None]
    prompt_mask = (shift >= 0).long()
    prompt_ids = input_ids[:n].gather(1, shift.clamp(min=0)).masked_fill(prompt_mask == 0, pad_id)

    order = torch.stack([torch.arange(n), torch.arange(n) + n], 1).flatten().to(input_ids.device)
    start, length = starts[order], (lengths - starts)[order]
    R = int(length.max())
    index = (start[:, None] + torch.arange(R, device=input_ids.device)[None]).clamp(max=width - 1)
    answer_mask = (torch.arange(R, device=input_ids.device)[None] < length[:, None]).long()
    answer_ids = input_ids[order].gather(1, index).masked_fill(answer_mask == 0, pad_id)
    answer_labels = labels[order].gather(1, index).masked_fill(answer_mask == 0, IGNORE_INDEX)
    not_pad = (input_ids[order] != pad_id).int() * columns[None].int()
    return SharedPairs(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       prompt_positions=(prompt_mask.cumsum(1) - 1).clamp(min=0),
                       answer_ids=answer_ids, answer_mask=answer_mask,
                       answer_positions=start[:, None] + torch.arange(R, device=input_ids.device)[None],
                       answer_labels=answer_labels, last_index=not_pad.argmax(1) - start,
                       batch_order=torch.argsort(order))


def _run(model, s: SharedPairs, **prompt_kwargs):
    """The prompt pass (its cache repeated to both answers), then the answers' pass."""
    from transformers import DynamicCache

    config = model.config
    cache = DynamicCache(config=config)
    first = model(input_ids=s.prompt_ids, attention_mask=s.prompt_mask, position_ids=s.prompt_positions,
                  cache=cache, use_cache=True, **prompt_kwargs)
    cache.batch_repeat_interleave(2)
    mask = torch.cat([s.prompt_mask.repeat_interleave(2, 0), s.answer_mask], 1)
    rest = model(input_ids=s.answer_ids, attention_mask=mask, position_ids=s.answer_positions, cache=cache,
                 use_cache=True)
    return first, rest


def pair_logits(model, s: SharedPairs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a causal LM over each row's answer, in the batch's row order, shaped so
    that ``sequence_logprobs(logits, labels)`` equals it on the whole rows: column 0 holds the
    prompt's last logits (predicting the first answer token) and an ignored label."""
    first, rest = _run(model, s, logits_to_keep=1)
    logits = torch.cat([first.logits.repeat_interleave(2, 0), rest.logits], 1)
    ignored = torch.full_like(s.answer_labels[:, :1], IGNORE_INDEX)
    labels = torch.cat([ignored, s.answer_labels], 1)
    return logits[s.batch_order], labels[s.batch_order]


def pair_scores(classifier, s: SharedPairs) -> Optional[torch.Tensor]:
    """A one-label sequence classifier's score of each row, in the batch's row order, pooled as
    transformers pools (the last token that is not padding); None when that token is in a prompt."""
    if bool((s.last_index < 0).any()):
        return None
    inner = classifier.get_base_model() if hasattr(classifier, "get_base_model") else classifier
    backbone = getattr(inner, inner.base_model_prefix)
    _, rest = _run(backbone, s)
    hidden = rest.last_hidden_state[torch.arange(len(s.last_index), device=s.last_index.device), s.last_index]
    return inner.score(hidden)[s.batch_order]
