"""FSDP2 and tensor parallelism applied to a transformers decoder (for ModelParallelStrategy).

``fully_shard`` wraps each decoder layer and then the root, so only one layer's full weights
exist at a time; the tensor-parallel plan shards attention and MLP projections column-wise in and
row-wise out (Megatron style), so each rank computes its share of heads and MLP channels.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from llmexp.parallel_plans import TP_ARCHITECTURES

# Column-parallel in, row-parallel out, for the architectures with q/k/v/o and gated MLPs.
TP_PLANS = {
    arch: {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
           "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
           "mlp.down_proj": "rowwise"}
    for arch in TP_ARCHITECTURES
}


def decoder_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The repeated transformer blocks (``model.layers``, ``transformer.h``), through PEFT wrappers."""
    for module in model.modules():
        for name in ("layers", "h"):
            blocks = getattr(module, name, None)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks) and module is not model:
                return list(blocks)
    raise ValueError("cannot find the decoder layers of this model")


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh, architecture: str) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = TP_PLANS[architecture]
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, {name: styles[style]() for name, style in plan.items()})


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as wrap,
    )

    layers = set(map(id, decoder_layers(model)))
    wrap(model, check_fn=lambda m: id(m) in layers)


def apply_fsdp(model: torch.nn.Module, dp_mesh, reshard_after_forward: bool,
               param_dtype: Optional[torch.dtype] = None) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def clip_grad_norm(params: List[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Total gradient norm (clipped to ``max_norm``) for plain, FSDP-sharded and TP-sharded grads.

    torch's clip_grad_norm_ refuses to mix DTensors of different meshes with plain tensors, which a
    TP model has (sharded projections, replicated norms and embeddings).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    squares = []
    for g in grads:
        n = g.detach().float().norm() ** 2
        squares.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.stack(squares).sum().sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device))
    return total
