"""The order of training samples: a seeded permutation per epoch, cut into optimizer-step windows.

The order is a pure function of (seed, epoch), so a resumed run continues with exactly the
samples the interrupted run would have seen next: it only needs the optimizer step it resumes
from. Under data parallelism each rank takes every world-size-th window, so the global batch is
``micro_batch_size * grad_accum * world_size`` samples per step.
"""

from __future__ import annotations

import math
from typing import Iterator, List

import torch


def steps_for_epochs(epochs: float, num_samples: int, window: int, world_size: int) -> tuple:
    """(optimizer steps for ``epochs`` passes, steps per pass): WindowSampler's windows per epoch,
    at least one step."""
    per_epoch = num_samples // (window * world_size)
    return max(1, math.ceil(epochs * per_epoch)), per_epoch


class WindowSampler:
    """A batch sampler yielding one optimizer step's sample indices (a window) at a time."""

    def __init__(self, num_samples: int, window: int, seed: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.num_samples, self.window, self.seed = num_samples, window, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = divmod(start_step, len(self)) if len(self) else (0, 0)
        # Lightning calls set_epoch on ``batch_sampler.sampler`` at every epoch start.
        self.sampler = self

    def __len__(self) -> int:
        """Windows (optimizer steps) per epoch for this rank; a partial last step is dropped."""
        return self.num_samples // (self.window * self.world_size)

    def order(self, epoch: int) -> List[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def __iter__(self) -> Iterator[List[int]]:
        order = self.order(self.epoch)
        w, world = self.window, self.world_size
        for step in range(self.skip, len(self)):
            start = (step * world + self.rank) * w
            yield order[start : start + w]

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start (it stops at len() without exhausting us)."""
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch
