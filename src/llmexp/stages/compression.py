"""What every compression stage (distill, prune, quantize) records, in one shape: the model it
compresses against the model it exports (weight bytes on disk, parameters, the fraction of
weights that are zero, greedy generation tokens/s), next to the run's task metric initial ->
final, so that ``llmexp compare`` puts the trade-offs of all three in one table."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch


def weight_bytes(directory: Optional[Path]) -> Optional[int]:
    """Bytes of a saved model's weight files (None for a model not on this disk, e.g. a hub id)."""
    if directory is None or not Path(directory).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def parameter_count(model) -> int:
    from llmexp.models.build import count_parameters

    return count_parameters(model)["parameters"]


def zero_fraction(model) -> Optional[float]:
    """The fraction of the model's weights that are exactly zero (None for a quantized model,
    whose weights are not plain tensors)."""
    from llmexp.models.build import packed_weights

    params = list(model.parameters())
    if packed_weights(model) or any(type(p.data) is not torch.Tensor for p in params):
        return None
    total = sum(p.numel() for p in params)
    return round(sum(int((p == 0).sum()) for p in params) / max(total, 1), 4)


SPEED_REPEATS = 3


def generation_speed(stage, model) -> float:
    """Greedy tokens per second of ``model`` on 32 of the task's prompts (NaN without a task),
    the median of SPEED_REPEATS timed batches after one untimed batch of the same shape: the
    tokens it generated, up to and including eos (not its answers' text re-tokenized, which
    counts nothing for a model that answers in whitespace). One batch after a 4-prompt warm-up
    read anywhere from 160 to 14,000 tokens/s for one model on a busy 2-core machine."""
    probe = getattr(stage, "task_probe", None)
    prompts: List[Any] = [r["prompt"] for r in probe.rows[:32]] if probe is not None else []
    if not prompts:
        return float("nan")
    stage.model, kept = model, stage.model
    rates = []
    try:
        # on rank 0 alone, with the whole model (after a sharded run's export)
        stage.greedy_responses(prompts, 24, alone=True)  # warm-up: the timed batches' own shapes
        for _ in range(SPEED_REPEATS):
            started = time.perf_counter()
            responses = stage.greedy_responses(prompts, 24, alone=True)
            rates.append(generated_tokens(responses, stage.tokenizer.eos_token_id) / (time.perf_counter() - started))
    finally:
        stage.model = kept
    return statistics.median(rates)


def generated_tokens(responses: torch.Tensor, eos_token_id: int) -> int:
    """Tokens of responses ``[B, T]`` (padded after eos) up to and including each one's first eos."""
    ended = responses == eos_token_id
    return int(torch.where(ended.any(1), ended.int().argmax(1) + 1, responses.shape[1]).sum())


def compression_record(before: Dict[str, Any], after_model, out_dir: Path, after_speed: Optional[float],
                       weight_bytes_after: Optional[int] = None) -> Dict[str, Any]:
    """summary.json's ``compression``: ``before`` (``dir``, ``parameters``, ``zero_fraction``,
    ``tokens_per_second`` of the model compressed) against the exported model (its weight files'
    bytes unless ``weight_bytes_after`` says otherwise; ``after_speed`` None where not measured)."""
    bytes_before = weight_bytes(before.get("dir"))
    bytes_after = weight_bytes_after if weight_bytes_after is not None else weight_bytes(out_dir)
    return {"model_before": str(Path(before["dir"]).resolve()) if before.get("dir") else before.get("source"),
            "weight_bytes_before": bytes_before, "weight_bytes_after": bytes_after,
            "size_ratio": round(bytes_before / bytes_after, 3) if bytes_before and bytes_after else None,
            "parameters_before": before["parameters"], "parameters_after": parameter_count(after_model),
            "zero_fraction_before": before["zero_fraction"], "zero_fraction_after": zero_fraction(after_model),
            "generation_tokens_per_second": {"before": round(before["tokens_per_second"], 1),
                                             "after": None if after_speed is None else round(after_speed, 1)}}


def describe(stage, model, directory: Optional[Path], source: Optional[str] = None) -> Dict[str, Any]:
    """The ``before`` of compression_record, measured now on ``model``."""
    return {"dir": directory, "source": source, "parameters": parameter_count(model),
            "zero_fraction": zero_fraction(model), "tokens_per_second": generation_speed(stage, model)}
