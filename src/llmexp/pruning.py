"""Structured pruning of a decoder (llama-style: ``model.model.layers[i].mlp.{gate,up,down}_proj``,
``self_attn.{q,k,v,o}_proj``): importances measured on real tokens, then the least important
MLP neurons, key/value head groups (each with its query heads) and whole layers removed, so the
result is a smaller model of the same architecture that plain transformers loads from its config.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Optional

import torch

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def _token_mask(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


@contextlib.contextmanager
def _inputs_of(modules: List[torch.nn.Module]) -> Iterator[List[List[torch.Tensor]]]:
    """Collect each module's input (its first positional argument) on every forward."""
    seen: List[List[torch.Tensor]] = [[] for _ in modules]
    hooks = [m.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].detach()))
             for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def importances(model, batches: Iterable[Dict[str, torch.Tensor]], head_dim: int, n_kv: int) -> Dict[str, list]:
    """Per layer: MLP neuron scores ``[intermediate]``, key/value group scores ``[n_kv]``; and one
    influence per layer (1 - mean cosine of its input and output hidden states)."""
    layers = model.model.layers
    downs, outs = [l.mlp.down_proj for l in layers], [l.self_attn.o_proj for l in layers]
    mlp = [torch.zeros(d.in_features) for d in downs]
    heads = [torch.zeros(n_kv) for _ in layers]
    influence = torch.zeros(len(layers))
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with _inputs_of(downs) as down_in, _inputs_of(outs) as o_in:
            for batch in batches:
                mask = _token_mask(batch)
                out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch}, output_hidden_states=True,
                            use_cache=False)
                hidden = out.hidden_states
                for i in range(len(layers)):
                    x = down_in[i].pop()[mask].float()  # [tokens, intermediate]
                    mlp[i] += x.abs().sum(0)
                    o = o_in[i].pop()[mask].float()  # [tokens, heads * head_dim]
                    per_head = o.view(o.shape[0], -1, head_dim).norm(dim=-1).sum(0)  # [heads]
                    heads[i] += per_head.view(n_kv, -1).sum(-1)
                    a, b = hidden[i][mask].float(), hidden[i + 1][mask].float()
                    influence[i] += (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).sum()
                tokens += int(mask.sum())
    finally:
        model.train(was_training)
    for i, layer in enumerate(layers):
        mlp[i] = mlp[i] / max(tokens, 1) * layer.mlp.down_proj.weight.float().norm(dim=0).cpu()
        o_norm = layer.self_attn.o_proj.weight.float().view(layer.self_attn.o_proj.out_features, -1, head_dim)
        heads[i] = heads[i] / max(tokens, 1) * o_norm.norm(dim=(0, 2)).view(n_kv, -1).sum(-1).cpu()
    return {"mlp": mlp, "heads": heads, "influence": (influence / max(tokens, 1)).tolist()}


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in their original order."""
    return torch.sort(torch.topk(scores, k).indices).values


def _rows(linear: torch.nn.Linear, keep: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None,
                          dtype=linear.weight.dtype, device=linear.weight.device)
    new.weight.data.copy_(linear.weight.data[keep])
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data[keep])
    return new


def _columns(linear: torch.nn.Linear, keep: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None,
                          dtype=linear.weight.dtype, device=linear.weight.device)
    new.weight.data.copy_(linear.weight.data[:, keep])
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data)
    return new


def prune_mlp(mlp, keep: torch.Tensor) -> None:
    mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, keep), _rows(mlp.up_proj, keep)
    mlp.down_proj = _columns(mlp.down_proj, keep)


def prune_head_groups(attn, keep_groups: torch.Tensor, head_dim: int, queries_per_group: int) -> None:
    """Keep the key/value heads ``keep_groups`` and the query heads that read them."""
    kv = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in keep_groups.tolist()])
    q_heads = [g * queries_per_group + j for g in keep_groups.tolist() for j in range(queries_per_group)]
    q = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in q_heads])
    attn.q_proj, attn.k_proj, attn.v_proj = _rows(attn.q_proj, q), _rows(attn.k_proj, kv), _rows(attn.v_proj, kv)
    attn.o_proj = _columns(attn.o_proj, q)


def prune(model, scores: Dict[str, list], mlp_keep: float, kv_heads_keep, layers_keep) -> Dict[str, list]:
    """Remove what ``scores`` rank lowest, in place, and make the config say the new sizes;
    returns what was kept (indices into the original model)."""
    config = model.config
    n_head = config.num_attention_heads
    n_kv = config.num_key_value_heads or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    kept: Dict[str, list] = {}
    if mlp_keep < 1.0:
        width = max(1, round(config.intermediate_size * mlp_keep))
        kept["mlp"] = []
        for layer, s in zip(model.model.layers, scores["mlp"]):
            keep = top(s, width)
            prune_mlp(layer.mlp, keep)
            kept["mlp"].append(keep.tolist())
        config.intermediate_size = width
    if kv_heads_keep is not None and kv_heads_keep < n_kv:
        kept["kv_heads"] = []
        for layer, s in zip(model.model.layers, scores["heads"]):
            keep = top(s, kv_heads_keep)
            prune_head_groups(layer.self_attn, keep, head_dim, n_head // n_kv)
            kept["kv_heads"].append(keep.tolist())
        config.head_dim = head_dim  # no longer hidden_size / num_attention_heads
        config.num_attention_heads = kv_heads_keep * (n_head // n_kv)
        config.num_key_value_heads = kv_heads_keep
    if layers_keep is not None and layers_keep < len(model.model.layers):
        keep = top(torch.tensor(scores["influence"]), layers_keep).tolist()
        model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
        for new_index, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in keep]
        config.num_hidden_layers = layers_keep
        kept["layers"] = keep
    return kept


def decoder_linears(model) -> Dict[str, torch.nn.Linear]:
    """The linear layers inside the decoder blocks (attention and MLP projections), by name: what
    unstructured sparsity prunes (embeddings, norms and the output head stay dense, as in Wanda's
    and SparseGPT's setups)."""
    return {f"model.layers.{i}.{name}": m for i, layer in enumerate(model.model.layers)
            for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def input_norms(model, linears: Dict[str, torch.nn.Linear], batches: Iterable[Dict[str, torch.Tensor]]
                ) -> Dict[str, torch.Tensor]:
    """Each linear's per-input-feature L2 norm over the real (unpadded) tokens of ``batches``."""
    names = list(linears)
    sums = {n: torch.zeros(linears[n].in_features) for n in names}
    was_training = model.training
    model.eval()
    try:
        with _inputs_of([linears[n] for n in names]) as seen:
            for batch in batches:
                mask = _token_mask(batch)
                model(**{k: batch[k] for k in MODEL_KEYS if k in batch}, use_cache=False)
                for n, inputs in zip(names, seen):
                    x = inputs.pop()[mask].float()
                    sums[n] += x.pow(2).sum(0).cpu()
    finally:
        model.train(was_training)
    return {n: s.sqrt() for n, s in sums.items()}


def sparsity_masks(linears: Dict[str, torch.nn.Linear], sparsity: float,
                   norms: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Per linear, the boolean mask of the weights kept: in each output row the ``sparsity``
    fraction with the lowest score is dropped. The score is |w| (magnitude pruning) or, given the
    inputs' feature norms, |w| * ||x_j|| (Wanda, Sun et al. 2023: a small weight on a large input
    matters)."""
    masks = {}
    for name, linear in linears.items():
        w = linear.weight.detach().float().abs().cpu()
        score = w * norms[name].unsqueeze(0) if norms is not None else w
        drop = int(round(w.shape[1] * sparsity))
        mask = torch.ones_like(w, dtype=torch.bool)
        if drop:
            mask.scatter_(1, torch.topk(score, drop, dim=1, largest=False).indices, False)
        masks[name] = mask.to(linear.weight.device)
    return masks


@torch.no_grad()
def apply_masks(linears: Dict[str, torch.nn.Linear], masks: Dict[str, torch.Tensor]) -> None:
    """Zero the dropped weights (after pruning, and again after every optimizer step of recovery)."""
    for name, mask in masks.items():
        linears[name].weight.mul_(mask.to(linears[name].weight.dtype))


def zero_fraction(linears: Dict[str, torch.nn.Linear]) -> float:
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    return zeros / max(1, sum(m.weight.numel() for m in linears.values()))
