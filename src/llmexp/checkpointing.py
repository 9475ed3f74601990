"""Checkpoints that survive a kill: atomic writes, RNG state, and finding where to resume.

A checkpoint is written to a temporary file in the same directory and renamed over the target,
so a SIGKILL during a save leaves the previous checkpoint intact. Resuming restores weights,
optimizer, scheduler, loop counters (hence the data position, see llmexp.data.sampler) and the
RNG states, so a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.plugins.io import TorchCheckpointIO

from llmexp.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are all-or-nothing (temp file + os.replace)."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    """RNG states in types ``torch.load(weights_only=True)`` accepts (no numpy arrays)."""
    state = _collect_rng_states(include_cuda=True)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    state["numpy"] = (kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached))
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    kind, keys, pos, has_gauss, cached = state["numpy"]
    _set_rng_states({**state, "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)})


def checkpoint_to_resume(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run: last.ckpt, else the highest step-*.ckpt."""
    from llmexp.record import RunDir

    return RunDir(run_dir).checkpoint_to_resume()


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was saved at."""
    import torch

    path = Path(path)
    if path.is_dir():  # sharded: the non-tensor state lives in meta.pt
        return int(torch.load(path / "meta.pt", map_location="cpu", weights_only=True)["global_step"])
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from for ``resume`` (a run dir, or "auto" for this run's dir)."""
    if resume is None:
        return None
    if resume == "auto":
        ckpt = checkpoint_to_resume(run_dir)
        return readable(ckpt) if ckpt is not None else None
    ckpt = checkpoint_to_resume(Path(resume))
    if ckpt is None:
        raise UserError(f"resume: {resume!r} has no checkpoint (checkpoints/last.ckpt or step-*.ckpt); "
                        f"start a new run without resume=")
    return readable(ckpt)


def readable(ckpt: Path) -> Path:
    """``ckpt``, once its header loads: a damaged checkpoint is refused before the run record is
    touched (not a traceback from deep inside Lightning after config.yaml was rewritten)."""
    try:
        checkpoint_step(ckpt)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a damaged file
        detail = (str(e).splitlines() or [""])[0][:200]
        others = sorted(p.name for p in Path(ckpt).parent.glob("step-*.ckpt") if p != Path(ckpt))
        raise UserError(f"resume: the checkpoint {ckpt} cannot be read ({type(e).__name__}: {detail}); it is "
                        f"damaged or incomplete. Move it aside to resume from an earlier one"
                        f"{' (' + ', '.join(others) + ')' if others else ''}, or start a new run without "
                        f"resume=") from None
    return ckpt
