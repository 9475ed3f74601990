"""Collation: rows of token ids -> padded tensors, and a window of micro-batches per optimizer step.

Each micro-batch carries ``num_tokens`` (non-padding tokens) and ``loss_weight`` (tokens that
count in the loss) as Python ints, so throughput and loss normalisation need no device sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import torch

from llmexp.data.encode import IGNORE_INDEX


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def collate_lm(rows: Sequence[Dict[str, List[int]]], pad_id: int) -> Dict[str, Any]:
    """Right-padded input_ids/labels. Packed rows (with position_ids) get no attention mask, so
    transformers masks attention per sample; padding becomes its own segment with no loss."""
    batch: Dict[str, Any] = {
        "input_ids": pad_rows([r["input_ids"] for r in rows], pad_id),
        "labels": pad_rows([r["labels"] for r in rows], IGNORE_INDEX),
    }
    if "position_ids" in rows[0]:
        width = batch["input_ids"].shape[1]
        batch["position_ids"] = pad_rows(
            [list(r["position_ids"]) + list(range(width - len(r["position_ids"]))) for r in rows], 0)
    else:
        batch["attention_mask"] = pad_rows([[1] * len(r["input_ids"]) for r in rows], 0)
    batch["num_tokens"] = sum(len(r["input_ids"]) for r in rows)
    # Targets are labels[1:], so the first label of each row never counts.
    batch["loss_weight"] = sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in rows)
    return batch


@dataclass
class WindowCollator:
    """Split one optimizer step's samples into ``grad_accum`` micro-batches, each collated alone
    (padding only to the longest row of its own micro-batch)."""

    collate: Any
    micro_batch_size: int

    def __call__(self, rows: Sequence[Any]) -> List[Dict[str, Any]]:
        n = self.micro_batch_size
        return [self.collate(rows[i : i + n]) for i in range(0, len(rows), n)]
