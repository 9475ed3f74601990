"""Training faults a user can act on: non-finite loss, out of memory.

A non-finite loss or gradient stops the run before the optimizer applies it, so the weights and
the last checkpoint on disk stay good. Both faults end with one message and advice, no traceback.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

from llmexp.errors import UserError


class TrainingFault(UserError):
    """The run could not go on; the message says why and what to change."""

    exit_code = 3


def check_finite(loss, grad_norm, step: int) -> None:
    """Raise TrainingFault when the step's loss or gradient norm is NaN or infinite."""
    values = {"loss": float(loss)}
    if grad_norm is not None:
        values["gradient norm"] = float(grad_norm)
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise TrainingFault(
            f"non-finite {what} at optimizer step {step}; the step was not applied and the last good "
            f"checkpoint is kept. Lower optim.lr, keep trainer.gradient_clip_val set (e.g. 1.0), use "
            f"trainer.precision=32-true or bf16-mixed instead of 16-mixed, and check the data; then "
            f"resume with resume=<run dir> or start again")


OOM_ADVICE = ("out of memory{where}. Try a smaller trainer.micro_batch_size (keep the global batch with "
              "trainer.grad_accum), a shorter data.max_length, model.gradient_checkpointing=true, "
              "peft=lora, or trainer.precision=bf16-mixed")


def oom_error(exc: BaseException) -> Optional[TrainingFault]:
    """A TrainingFault with advice when ``exc`` is an out-of-memory error, else None."""
    import torch

    text = str(exc)
    is_oom = isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text))
    if not is_oom:
        return None
    where = " on the GPU" if "CUDA" in text or isinstance(exc, torch.OutOfMemoryError) else ""
    return TrainingFault(OOM_ADVICE.format(where=where))


@contextlib.contextmanager
def explain_faults() -> Iterator[None]:
    """Turn out-of-memory errors (also when Lightning wraps them) into a TrainingFault."""
    try:
        yield
    except UserError:
        raise
    except BaseException as exc:  # noqa: BLE001 - re-raised unless it is an OOM
        cause = exc
        while cause is not None:
            fault = oom_error(cause)
            if fault is not None:
                raise fault from None
            cause = cause.__cause__ or cause.__context__
        raise
