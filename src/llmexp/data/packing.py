"""Packing: several tokenized samples per row, with no attention and no loss across samples.

Position ids restart at 0 for every sample; with no attention mask, transformers builds a
block-diagonal causal mask from them (``find_packed_sequence_indices``), so a packed row computes
exactly what the samples compute alone. Labels of the first token of each sample are never
predicted from the previous sample because the shift happens inside each sample's span.
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Sequence

from llmexp.data.encode import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins of sample indices: each sample, longest first, goes into the fullest bin it fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    free: List[tuple] = []  # sorted (space left, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the packing capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            if space - n > 0:
                bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            if capacity - n > 0:
                bisect.insort(free, (capacity - n, len(bins) - 1))
    return [sorted(b) for b in bins]


def pack(samples: Sequence[Dict[str, List[int]]], capacity: int) -> List[Dict[str, List[int]]]:
    """Rows of at most ``capacity`` tokens, each with input_ids, labels and position_ids."""
    rows = []
    for b in best_fit_decreasing([len(s["input_ids"]) for s in samples], capacity):
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for i in b:
            ids, labels = samples[i]["input_ids"], samples[i]["labels"]
            row["input_ids"] += ids
            # The first token of a sample is never a target of the previous sample's last token:
            # the model shifts labels inside the row, so mark the boundary explicitly.
            row["labels"] += [IGNORE_INDEX] + list(labels[1:])
            row["position_ids"] += list(range(len(ids)))
        rows.append(row)
    return rows
