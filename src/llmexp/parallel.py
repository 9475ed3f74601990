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


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh, architecture: str, sequence_parallel: bool = False) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if sequence_parallel:
        return apply_sequence_parallel(model, tp_mesh, architecture)
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = TP_PLANS[architecture]
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, {name: styles[style]() for name, style in plan.items()})


def apply_sequence_parallel(model: torch.nn.Module, tp_mesh, architecture: str) -> None:
    """Tensor parallelism with the residual stream sharded along the sequence (Megatron-style SP).

    The first decoder layer splits its input along the sequence; each norm works on its shard
    (``SequenceParallel``: its replicated weight's gradient is summed over the group); attention
    and MLP inputs are all-gathered before the column-wise projections, and the row-wise outputs
    reduce-scattered back to sequence shards; the final norm's output is all-gathered for the
    head. Positions, rotary embeddings and the attention mask are built for the full sequence by
    the model as usual, so a batch's length must divide by the tensor-parallel size.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    p = TP_PLANS[architecture]
    for i, layer in enumerate(decoder_layers(model)):
        plan = {name: ColwiseParallel() if style == "colwise" else RowwiseParallel(output_layouts=Shard(1))
                for name, style in p.items()}
        plan.update({
            "input_layernorm": SequenceParallel(),
            "post_attention_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        })
        if i == 0:
            plan[""] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                          use_local_output=True)
        parallelize_module(layer, tp_mesh, plan)
    stack = next(m for m in model.modules() if isinstance(getattr(m, "layers", None), torch.nn.ModuleList))
    parallelize_module(stack.norm, tp_mesh, SequenceParallel())
    heads = [m for name in ("lm_head", "score") for m in [_find(model, name)] if m is not None]
    for head in heads:  # the head itself stays whole: it gets the gathered sequence as a plain tensor
        parallelize_module(head, tp_mesh, PrepareModuleInput(input_layouts=(Shard(1),),
                                                             desired_input_layouts=(Replicate(),),
                                                             use_local_output=True))


def _find(model: torch.nn.Module, name: str):
    for module_name, module in model.named_modules():
        if module_name.rsplit(".", 1)[-1] == name:
            return module
    return None


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
    # The root unit is the transformers model: a PEFT wrapper's generate() calls the inner model's
    # forward, which would skip a root hook on the wrapper and leave the embeddings sharded.
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    fully_shard(root, **kwargs)


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
