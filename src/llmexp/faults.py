"""Training faults a user can act on: non-finite loss, out of memory, a full disk.

A non-finite loss or gradient stops the run before the optimizer applies it, so the weights and
the last checkpoint on disk stay good. A full disk (or quota, or file-size limit) stops the run
with the partial file removed and the checkpoint a resume continues from named, when there is
one. Every fault ends with one message and advice (exit code 3), no traceback.
"""

from __future__ import annotations

import contextlib
import errno
import math
from pathlib import Path
from typing import Iterator, Optional, Tuple

from llmexp.errors import UserError


class TrainingFault(UserError):
    """The run could not go on; the message says why and what to change."""

    exit_code = 3


def check_finite(loss, grad_norm, step: int, run_dir: Optional[Path] = None) -> None:
    """Raise TrainingFault when the step's loss or gradient norm is NaN or infinite; the message
    names the checkpoint a resume continues from, or says there is none (``run_dir``: the run's)."""
    values = {"loss": float(loss)}
    if grad_norm is not None:
        values["gradient norm"] = float(grad_norm)
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k} = {v}" for k, v in bad.items())
        ckpt, kept_step = kept_checkpoint(run_dir)
        if ckpt is not None and kept_step is not None:
            then = (f"the last good checkpoint {ckpt} (step {kept_step}) is kept; with the fix, continue with the "
                    f"same overrides and resume={run_dir}, or start again")
        elif ckpt is not None:
            then = f"the newest checkpoint, {ckpt}, cannot be read (resume= says what to do then)"
        else:
            then = ("no checkpoint had been written yet (trainer.checkpoint_every_n_steps sets how often), so "
                    "there is nothing to resume: start again in a new run directory")
        raise TrainingFault(
            f"non-finite {what} at optimizer step {step}; the step was not applied. Lower optim.lr, keep "
            f"trainer.gradient_clip_val set (e.g. 1.0), use trainer.precision=32-true or bf16-mixed instead of "
            f"16-mixed, and check the data; {then}")


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


DISK_FULL = {errno.ENOSPC: "the disk is full (no space left on the device)",
             errno.EDQUOT: "the disk quota is used up",
             errno.EFBIG: "the file would exceed the file-size limit of this process (ulimit -f)"}


def _disk_full_errno(exc: Optional[BaseException]) -> Optional[int]:
    """The disk-full errno of ``exc`` or of an exception it wraps, else None."""
    return next((e.errno for e in _chain(exc) if isinstance(e, OSError) and e.errno in DISK_FULL), None)


def kept_checkpoint(run_dir: Optional[Path]) -> Tuple[Optional[Path], Optional[int]]:
    """(the checkpoint a resume of ``run_dir`` continues from, its step); (None, None) when there
    is none, and step None when it cannot be read: a message never claims what it has not read."""
    if run_dir is None:
        return None, None
    from llmexp.record import RunDir, checkpoint_step

    ckpt = RunDir(run_dir).checkpoint_to_resume()
    if ckpt is None:
        return None, None
    try:
        return ckpt, checkpoint_step(ckpt)
    except Exception:  # noqa: BLE001 - torch raises several types for a damaged file
        return ckpt, None


def disk_full(exc: BaseException, directory: Optional[Path], run_dir: Optional[Path],
              writing: str = "a file") -> Optional[TrainingFault]:
    """A TrainingFault when ``exc`` is (or wraps) a full disk, quota or file-size limit, else None.

    ``directory`` is where the write of ``writing`` failed (None: the failed file's directory);
    ``run_dir`` the run's directory, to name the checkpoint that is kept."""
    code = _disk_full_errno(exc)
    if code is None:
        return None
    if directory is None:
        filename = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
        directory = Path(filename).parent if filename else run_dir
    where = f"in {directory}" if directory else "on the disk"
    fix = {errno.ENOSPC: f"Free space {where} (df -h {directory or '.'})",
           errno.EDQUOT: f"Free space {where} or raise the disk quota",
           errno.EFBIG: "Raise the file-size limit (ulimit -f unlimited)"}[code]
    ckpt, step = kept_checkpoint(run_dir)
    if ckpt is not None and step is None:
        then = f"the newest checkpoint, {ckpt}, cannot be read (resume= says what to do then). {fix}"
    elif ckpt is not None:
        then = (f"the last good checkpoint {ckpt} (step {step}) is kept. {fix}, then continue with the same "
                f"overrides and resume={run_dir}")
    elif run_dir is not None:
        then = (f"no checkpoint had been written yet, so there is nothing to resume. {fix} and start the run "
                f"again in a new run directory")
    else:
        then = f"{fix}, then resume from the run's last checkpoint, if it has one"
    removed = " (its partial file was removed)" if writing == "a checkpoint" else ""
    return TrainingFault(f"cannot write {writing} {where}: {DISK_FULL[code]}. The run stopped{removed}; {then}")


def _chain(exc: Optional[BaseException]):
    seen = 0
    while exc is not None and seen < 20:
        yield exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


@contextlib.contextmanager
def explain_disk_full(run_dir: Path) -> Iterator[None]:
    """Turn a full disk met anywhere in a run (metrics, export, summary) into a TrainingFault that
    names the checkpoint a resume continues from (checkpoint saves raise theirs themselves)."""
    try:
        yield
    except UserError:
        raise
    except BaseException as exc:  # noqa: BLE001 - re-raised unless the disk is full
        fault = disk_full(exc, None, run_dir)
        if fault is not None:
            raise fault from None
        raise
