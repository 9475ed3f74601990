"""The frozen starting policy that dpo, ppo and grpo compare against, in one place.

Either a frozen copy, kept out of the module tree (no optimizer state, no checkpoint, so
Lightning does not move it and ``place`` follows the policy by hand), or, under LoRA, the policy
itself with its adapter disabled (no second copy in memory). dpo's ``precomputed`` reference is
this one run once over the data, then freed.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class Reference:
    def __init__(self, model: Optional[torch.nn.Module]):
        self.copy = model

    @classmethod
    def of(cls, model: torch.nn.Module, keep_copy: bool) -> "Reference":
        """The reference of a policy about to be built from ``model`` (before any adapter):
        a frozen copy when ``keep_copy``, else the adapter-disabled policy."""
        return cls(frozen(copy.deepcopy(model)) if keep_copy else None)

    def place(self, policy: torch.nn.Module) -> None:
        """Follow the policy's device and dtype."""
        if self.copy is not None:
            p = next(policy.parameters())
            self.copy.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)

    @contextlib.contextmanager
    def model(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The module to run for reference outputs (under no_grad)."""
        with torch.no_grad():
            if self.copy is not None:
                yield self.copy
            else:
                with policy.disable_adapter():
                    yield policy

    def free(self) -> None:
        self.copy = None
