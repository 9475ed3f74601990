"""Checkpoints that survive a kill: atomic writes, RNG state, and finding where to resume.

A checkpoint is written to a temporary file in the same directory (``.<name>.tmp<pid>``) and
renamed over the target, so a SIGKILL during a save leaves the previous checkpoint intact; the
partial file such a kill leaves is removed when the run directory is next used
(:func:`remove_stale_partials`). A save that fails (a full disk) removes its partial file and
stops the run with one message saying which checkpoint is kept. Resuming restores weights,
optimizer, scheduler, loop counters (hence the data position, see llmexp.data.sampler) and the
RNG states, so a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from llmexp.errors import UserError
from llmexp.record import checkpoint_step


@contextlib.contextmanager
def ctrl_c_after_the_block():
    """Ctrl+C (SIGINT) during the block takes effect when it ends: a KeyboardInterrupt inside
    torch.save surfaced as its zip writer's "unexpected pos" RuntimeError, so a run stopped while it
    saved reported that instead of where it stood. Only in the main thread, and only where a Python
    handler is installed (Python's own, or training's :class:`StopRequest`; Lightning ignores SIGINT
    while it shuts down): the handler in place before the block gets the signal after it."""
    if threading.current_thread() is not threading.main_thread() or not callable(signal.getsignal(signal.SIGINT)):
        yield
        return
    caught: List[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    for signum in caught:
        handler = signal.getsignal(signal.SIGINT)  # the first may install another (StopRequest does)
        if callable(handler):
            handler(signum, None)


class StopRequest:
    """During training, the first Ctrl+C (SIGINT) or SIGTERM (timeout, Slurm's preemption, systemd,
    ``docker stop``) asks the run to stop once the step it is in ends, with a checkpoint of that
    step: they stopped it at once, losing every step since the last periodic checkpoint. A second
    one stops it as before: Ctrl+C at once, SIGTERM as Lightning does. Installed only in the main
    thread, and not over a signal that is ignored (a run started with SIGINT ignored keeps it so)."""

    SIGNALS = {signal.SIGINT: "Ctrl+C", signal.SIGTERM: "SIGTERM"}

    def __init__(self) -> None:
        self.asked = False
        self.signum: Optional[int] = None  # the signal that asked (the run exits 128 + it, as a shell reports it)
        self._previous: Dict[int, Any] = {}
        self._says = True

    def install(self, says: bool = True) -> None:
        """``says``: whether this process prints that the request was heard (rank 0 alone)."""
        self.asked, self.signum, self._says = False, None, says
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            if signal.getsignal(signum) not in (signal.SIG_IGN, None):
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def remove(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        for other, previous in self._previous.items():  # the next one of either stops the run as before
            if signal.getsignal(other) == self._on_signal:
                signal.signal(other, previous)
        self.asked, self.signum = True, signum
        if self._says:
            again = " (Ctrl+C again stops now, from the last checkpoint)" if signum == signal.SIGINT else ""
            sys.stderr.write(f"llmexp: {self.SIGNALS.get(signum, signum)}: stopping when this step ends, with a "
                             f"checkpoint of it{again}\n")
            sys.stderr.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are all-or-nothing (temp file + os.replace).

    The checkpoint is serialized straight into the temporary file next to the target (Lightning's
    own save goes through a second temporary file in $TMPDIR, which a kill leaves behind there
    and which hides a full run-directory disk until the final copy)."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        import torch

        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_path(path)
        try:
            with ctrl_c_after_the_block():
                with open(tmp, "wb") as fh:
                    torch.save(checkpoint, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)  # never leave half a checkpoint behind
            fault = disk_full_fault(exc, path)
            if fault is not None:
                raise fault from None
            raise
        _fsync_dir(path.parent)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, made safe to resume after a kill or in a moved run directory.

    - No version counter: a resumed run that reaches a step whose file a killed run already wrote
      (killed between step-N.ckpt and last.ckpt) overwrites it atomically with the same state,
      instead of writing step-N-v1.ckpt / last-v1.ckpt beside it and leaving the original for good.
    - The paths it remembers (the step file to replace next, last.ckpt) are moved to the current
      checkpoints/ when the run directory was moved, so the old step file is still replaced
      (Lightning keeps the old directory's paths and then never removes the file).
    - Its state is stored under ModelCheckpoint's key, so checkpoints written before load as they did.
    - At a step that is validated, it saves after the validation (Lightning saves a step's checkpoint
      before it): the checkpoint then holds what the validation found (trainer.monitor's best,
      early stopping's count), which a run resumed from it does not validate again.
    - It keeps the newest ``keep`` step files (trainer.keep_checkpoints; None: all), found by listing
      the directory: a resumed run with a lower number removes the older ones a session before kept.
    - A step's two files (step-N.ckpt, last.ckpt) are one save for Ctrl+C: stopped between them, a
      run kept last.ckpt of the save before, which a resume takes, redoing the steps in between.
    - Ctrl+C in training (:class:`StopRequest`) stops the run when its step ends (after the step's
      validation, when it has one), saved as a periodic checkpoint is: every rank stops at the same
      step, which a resume continues from exactly.
    """

    def __init__(self, keep: Optional[int] = 1, **kwargs: Any):
        # Lightning keeps one step file or all (no metric ranks them): the newest ``keep`` by listing
        super().__init__(enable_version_counter=False, save_top_k=-1, **kwargs)
        self.keep = keep
        self.stop_request = StopRequest()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero and self.dirpath:
            save_tokenizer(getattr(pl_module, "tokenizer", None), Path(self.dirpath) / "tokenizer")
        self.stop_request.install(says=trainer.is_global_zero)

    def _save_none_monitor_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_none_monitor_checkpoint(trainer, monitor_candidates)
        if self.keep is not None:  # the newest trainer.keep_checkpoints step files stay (a resume may lower it)
            from llmexp.record import RunDir

            for old in RunDir(Path(self.dirpath).parent).step_checkpoints()[:-self.keep]:
                if self._should_remove_checkpoint(trainer, str(old), self.best_model_path):
                    self._remove_checkpoint(trainer, str(old))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every, validated = self._every_n_train_steps, validates_after(trainer)
        if every and trainer.global_step % every == 0 and validated:
            if not self._should_skip_saving_checkpoint(trainer):
                self._defer_save_until_validation = True  # Lightning's own deferral: saved in on_validation_end
            return
        with ctrl_c_after_the_block():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not validated:  # else the step ends after its validation (on_validation_end)
            self._stop_if_asked(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        with ctrl_c_after_the_block():
            super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._stop_if_asked(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        with ctrl_c_after_the_block():
            super().on_train_end(trainer, pl_module)
        self.stop_request.remove()
        asked = self.stop_request.asked  # heard after the last step's check: the run has its last.ckpt
        if trainer.world_size > 1:  # every rank stops, or none (one waiting in a collective would hang)
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if asked:
            raise KeyboardInterrupt

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.stop_request.remove()
        super().teardown(trainer, pl_module, stage)

    def _stop_if_asked(self, trainer) -> None:
        """Save this step (unless just saved) and stop as Ctrl+C does, when a Ctrl+C was heard on
        any rank (one collective per step where there are several)."""
        asked = self.stop_request.asked
        if trainer.world_size > 1:
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if not asked:
            return
        if self._last_global_step_saved != trainer.global_step:
            with ctrl_c_after_the_block():
                candidates = self._monitor_candidates(trainer)
                self._save_topk_checkpoint(trainer, candidates)
                self._save_last_checkpoint(trainer, candidates)
                self._last_global_step_saved = trainer.global_step
        raise KeyboardInterrupt

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and Path(old) != Path(self.dirpath):
            here = Path(self.dirpath)

            def moved(p: Any) -> Any:
                return str(here / Path(p).name) if p and Path(p).parent == Path(old) else p

            state_dict = {**state_dict, "dirpath": self.dirpath,
                          **{k: moved(state_dict.get(k)) for k in ("best_model_path", "last_model_path",
                                                                   "kth_best_model_path")},
                          "best_k_models": {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}}
        super().load_state_dict(state_dict)


def save_tokenizer(tokenizer, into: Path) -> None:
    """The run's tokenizer in ``into`` (once: a resumed run has it), written whole or not at all."""
    if tokenizer is None or into.exists():
        return
    scratch = partial_path(into)  # a kill leaves it to remove_stale_partials
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        tokenizer.save_pretrained(str(scratch))
        os.replace(scratch, into)
    except OSError as exc:
        fault = disk_full_fault(exc, into)
        if fault is not None:
            raise fault from None
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def validates_after(trainer) -> bool:
    """Whether a validation follows the training step just done (a step is one batch here, so
    Lightning validates after every val_check_batch-th step)."""
    every = getattr(trainer, "val_check_batch", None)
    return (isinstance(every, int) and every > 0 and trainer.global_step % every == 0
            and bool(getattr(trainer, "enable_validation", False)))


def partial_path(path: Path) -> Path:
    """The temporary file a save of ``path`` by this process writes before renaming it."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (a power cut after a save keeps the new checkpoint)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ``.<name>.tmp<pid>`` (the record's files add a suffix after the pid: .loss_curve.png.tmp12.png)
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)(\.[A-Za-z0-9]+)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(run_dir: Path) -> List[Path]:
    """Remove the partial files (``.<name>.tmp<pid>``) that a killed or failed save left in the
    run directory and its checkpoints/, when the process that wrote them is gone; return them.

    Only temporary files go: complete checkpoints and record files are never touched."""
    from llmexp.record import RunDir

    record = RunDir(run_dir)
    removed = []
    for directory in (record.path, record.checkpoints):
        if not directory.is_dir():
            continue
        for p in sorted(directory.iterdir()):
            m = _PARTIAL.match(p.name)
            if m is None or p.is_symlink() or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
                continue
            try:
                if p.is_dir():  # a tokenizer's save
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p)
    return removed


def disk_full_fault(exc: BaseException, writing: Path):
    """A TrainingFault when ``exc`` says the disk (or quota, or file-size limit) is full while
    ``writing`` a checkpoint, else None. It names the directory and, only when there is one, the
    checkpoint a resume continues from."""
    from llmexp.faults import disk_full

    return disk_full(exc, Path(writing).parent, _run_dir_of(Path(writing)), "a checkpoint")


def _run_dir_of(checkpoint: Path) -> Optional[Path]:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


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


def check_steps_left(ckpt: Path, max_steps: Optional[int]) -> None:
    """A resumed run trains on to ``max_steps``: one below the checkpoint's step would end the run
    there, finished and never resumable again, with nothing trained (the step itself is allowed:
    a run killed during its export finishes it)."""
    from llmexp.errors import ConfigError, Problem

    step = checkpoint_step(ckpt)
    if max_steps is not None and 0 < max_steps < step:
        raise ConfigError([Problem("trainer.max_steps", f"is {max_steps}, below step {step} where the run being "
                                   f"resumed saved {ckpt.name}: it would end the run there, untrained",
                                   f"trainer.max_steps={step} or more (a resumed run trains on from its "
                                   f"checkpoint)")])


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
