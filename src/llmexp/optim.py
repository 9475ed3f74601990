"""AdamW and the learning-rate schedules (warm-up, then cosine, linear or constant)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from llmexp.config.schema import OptimConfig


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, kind: str, min_ratio: float) -> float:
    """Factor on the peak lr at optimizer step ``step`` (0-based): linear warm-up from 1/(w+1),
    then decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms and embeddings' 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """Warm-up clamped so that at least one step runs at the peak: a 5-step smoke run with the
    default 10 warm-up steps warms up for 4 (the run record says so)."""
    return max(0, min(warmup_steps, total_steps - 1))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int, default_fused: bool = True):
    """AdamW, fused by default (one kernel for all parameters: ~4x faster steps than foreach on a
    CPU, and the fast path on CUDA), with the warm-up + decay schedule as a LambdaLR."""
    fused = cfg.fused if cfg.fused is not None else default_fused
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                            eps=cfg.eps, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(
        s, warmup_steps=effective_warmup(cfg.warmup_steps, total_steps), total_steps=total_steps, kind=cfg.scheduler,
        min_ratio=cfg.min_lr_ratio))
    return opt, sched


def rebase_lr(opt, sched, lr: float) -> Optional[float]:
    """Make ``lr`` the peak of the schedule at its current step (a resumed run may change optim.lr;
    the checkpoint's scheduler state holds the old one). Returns the old peak when it changed."""
    old = sched.base_lrs[0]
    if math.isclose(old, lr, rel_tol=1e-9, abs_tol=0.0):
        return None
    sched.base_lrs = [lr for _ in sched.base_lrs]
    for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in opt.param_groups]
    return old
