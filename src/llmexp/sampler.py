"""The rollout sampler: responses to left-padded prompts from a transformers causal LM, with the
per-token work of ``model.generate`` cut to a forward pass and one sampling step.

Why not ``model.generate``: on the RL path a prompt is answered several times (grpo's group) and
responses stop at very different lengths. Here

- a prompt is prefilled once and its KV cache expanded to its samples (``share_prefill``),
- finished responses leave the batch, so late tokens do not pay for early stoppers
  (``drop_finished``),
- the log-probs, entropies and last hidden states of the sampled tokens come out of the decode
  itself, so the old policy needs no second forward pass.

Sampling is transformers' own temperature, top-k and top-p warpers in generate's order, then one
draw per row from the global torch RNG (``draw``: torch.multinomial's law from one uniform number
per row), so responses follow generate's distribution; greedy responses are generate's
tokens. ``engine="generate"`` keeps ``model.generate`` as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

from llmexp.advantages import entropy_of


@dataclass
class Sampled:
    """What one call produced, one row per response (prompt-major: a prompt's samples adjacent)."""

    responses: torch.Tensor  # [N, T] token ids, pad after eos
    logprobs: Optional[torch.Tensor] = None  # [N, T] log-prob of each token at the temperature
    entropy: Optional[torch.Tensor] = None  # [N, T] entropy of the distribution it was drawn from
    hidden: Optional[torch.Tensor] = None  # [N, T, H] last hidden state that predicted each token
    turns: Optional[Any] = None  # llmexp.tool_rollout.ToolTurns: responses that called tools and answered on

    def rows(self, start: int, stop: int) -> "Sampled":
        """Responses ``start`` to ``stop`` (and what came with them)."""
        cut = lambda x: None if x is None else x[start:stop]  # noqa: E731
        return Sampled(self.responses[start:stop], cut(self.logprobs), cut(self.entropy), cut(self.hidden),
                       None if self.turns is None else self.turns.rows(start, stop))

    def trimmed(self, eos_token_id: int) -> "Sampled":
        """Cut to the longest response, so no later pass pays for columns that are padding in every row."""
        from llmexp.advantages import response_mask

        real = response_mask(self.responses, eos_token_id) if self.turns is None else self.turns.real_mask
        width = max(int(real.sum(1).max()), 1)
        if width == self.responses.shape[1]:
            return self
        cut = lambda x: None if x is None else x[:, :width]  # noqa: E731
        return Sampled(self.responses[:, :width], cut(self.logprobs), cut(self.entropy), cut(self.hidden),
                       None if self.turns is None else self.turns.cut(width))


def warpers(temperature: float, top_k: int, top_p: float) -> List[Callable]:
    """transformers' logits warpers, in the order generate applies them."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    out: List[Callable] = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` [N, V], drawn with probability ``probs`` (torch.multinomial's
    law). On a CPU by inverting the row's cumulative distribution with one uniform number:
    torch.multinomial draws a random number for every vocabulary entry there, 1.3 ms against
    0.08 ms for 128 rows of 512 tokens on one core, a quarter of a grpo rollout's time. Elsewhere
    torch.multinomial itself (fast on a GPU, and no float64 copy of a large vocabulary)."""
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1).squeeze(1)
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).squeeze(1)
    # u can round up to the row's total: never past the last token that has any probability
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
    return torch.minimum(token, last)


def own_storage(cache) -> None:
    """Give the cache's keys and values storage of their own. After the prefill they are views
    (of the attention's projections), after the first decode step whole tensors (torch.cat):
    the compiled decode step would compile again for the second step on that difference alone."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()


class Sampler:
    """Answers prompts with ``model``; see the module docstring for what differs from generate.

    ``lockstep`` (a sharded model across ranks): every rank runs the same number of forward
    passes, so a rank whose responses all ended keeps one finished row going until all have."""

    def __init__(self, model, eos_token_id: int, pad_token_id: int, *, share_prefill: bool = True,
                 drop_finished: bool = True, lockstep: bool = False, compile: bool = False):  # noqa: A002
        self.model, self.eos, self.pad = model, eos_token_id, pad_token_id
        self.share_prefill, self.drop_finished, self.lockstep = share_prefill, drop_finished, lockstep
        # The decode step (one token per row against a growing cache) compiled once for dynamic
        # batch and cache sizes; the prefill stays eager (its shapes change with every batch).
        self.step = torch.compile(model, dynamic=True) if compile else model

    @torch.no_grad()
    def __call__(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, *,
                 samples_per_prompt: int = 1, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, with_logprobs: bool = False, with_hidden: bool = False) -> Sampled:
        from transformers import DynamicCache

        model, k = self.model, samples_per_prompt
        was_training = model.training
        model.eval()
        try:
            if not (self.share_prefill and k > 1):
                prompt_ids, prompt_mask, k = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0), 1
            cache = DynamicCache(config=model.config)
            out = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0), cache=cache,
                        use_cache=True, output_hidden_states=with_hidden, logits_to_keep=1)
            logits = out.logits[:, -1].float()
            hidden = out.hidden_states[-1][:, -1] if with_hidden else None
            if k > 1:
                cache.batch_repeat_interleave(k)
                logits, prompt_mask = logits.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
                hidden = hidden.repeat_interleave(k, 0) if hidden is not None else None
            if self.step is not model:
                own_storage(cache)
            return self._decode(cache, logits, hidden, prompt_mask, max_new_tokens, greedy,
                                warpers(temperature, top_k, top_p), temperature, with_logprobs)
        finally:
            model.train(was_training)

    def _decode(self, cache, logits, hidden, mask, max_new_tokens, greedy, warp, temperature,
                with_logprobs) -> Sampled:
        n, device = logits.shape[0], logits.device
        responses = torch.full((n, max_new_tokens), self.pad, dtype=torch.long, device=device)
        logprobs = torch.zeros(n, max_new_tokens, device=device) if with_logprobs else None
        entropy = torch.zeros(n, max_new_tokens, device=device) if with_logprobs else None
        hiddens = (torch.zeros(n, max_new_tokens, hidden.shape[-1], dtype=hidden.dtype, device=device)
                   if hidden is not None else None)
        rows = torch.arange(n, device=device)  # which response each batch row is
        finished = torch.zeros(n, dtype=torch.bool, device=device)  # per batch row
        position = mask.sum(-1, keepdim=True)  # next token's position id: real tokens so far
        for t in range(max_new_tokens):
            token = torch.where(finished, self.pad, self._pick(logits, t, greedy, warp))
            responses[rows, t] = token
            if with_logprobs:
                scaled = torch.log_softmax(logits / temperature, -1)
                live = (~finished).float()
                logprobs[rows, t] = scaled.gather(-1, token[:, None]).squeeze(-1) * live
                entropy[rows, t] = entropy_of(scaled) * live
            if hiddens is not None:
                hiddens[rows, t] = hidden
            finished = finished | (token == self.eos)
            if t == max_new_tokens - 1 or self._all_done(finished):
                break
            if self.drop_finished and finished.any():
                keep = self._rows_to_keep(finished)
                if keep is not None:
                    cache.batch_select_indices(keep)
                    rows, finished, token, mask, position = (rows[keep], finished[keep], token[keep], mask[keep],
                                                             position[keep])
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            out = self.step(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache,
                             use_cache=True, output_hidden_states=hiddens is not None)
            position = position + 1
            logits = out.logits[:, -1].float()
            hidden = out.hidden_states[-1][:, -1] if hiddens is not None else None
        return Sampled(responses, logprobs, entropy, hiddens)

    def _pick(self, logits: torch.Tensor, t: int, greedy: bool, warp: List[Callable]) -> torch.Tensor:
        """The next token of every row: at least one token before eos (generate's min_new_tokens=1)."""
        scores = logits.clone()
        if t == 0:
            scores[:, self.eos] = float("-inf")
        if greedy:
            return scores.argmax(-1)
        for w in warp:
            scores = w(None, scores)
        return draw(torch.softmax(scores, -1))

    def _rows_to_keep(self, finished: torch.Tensor) -> Optional[torch.Tensor]:
        """Indices of the rows to keep decoding (None: keep all). Under lockstep one finished row
        stays when all have ended here, so this rank can keep pace with the others."""
        keep = (~finished).nonzero().squeeze(1)
        if keep.numel() == 0:
            keep = keep.new_zeros(1) if self.lockstep else keep
        return None if keep.numel() == finished.numel() else keep

    def _all_done(self, finished: torch.Tensor) -> bool:
        left = (~finished).sum()
        if self.lockstep and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(left)
        return int(left) == 0
