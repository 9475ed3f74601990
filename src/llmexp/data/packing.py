"""Packing: several tokenized samples per row, with no attention and no loss across samples.

Position ids restart at 0 for every sample; with no attention mask, transformers builds a
block-diagonal causal mask from them (``find_packed_sequence_indices``), so a packed row computes
exactly what the samples compute alone. Labels of the first token of each sample are never
predicted from the previous sample because the shift happens inside each sample's span.
"""

from __future__ import annotations

import bisect
import heapq
from typing import Dict, List, Sequence

from llmexp.data.encode import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins of sample indices: each sample, longest first, goes into the fullest bin it fits (the
    lowest-numbered such bin). Bins are kept by their free space, of which there are at most
    ``capacity`` values, so a million samples pack in seconds."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    by_space: Dict[int, List[int]] = {}  # free space -> heap of bin indices with that much left
    spaces: List[int] = []  # sorted free-space values that have bins
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the packing capacity {capacity}")
        k = bisect.bisect_left(spaces, n)
        if k < len(spaces):
            space = spaces[k]
            b = heapq.heappop(by_space[space])
            if not by_space[space]:
                spaces.pop(k)
            bins[b].append(i)
            left = space - n
        else:
            b, left = len(bins), capacity - n
            bins.append([i])
        if left > 0:
            if not by_space.get(left):
                by_space[left] = []
                bisect.insort(spaces, left)
            heapq.heappush(by_space[left], b)
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
