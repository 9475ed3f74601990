"""Faults injected into real CLI runs: SIGKILL at seeded points (in the middle of writing a
checkpoint too), a full disk while a checkpoint is written, a file-size limit. Each time the last
good checkpoint resumes to the weights and metrics of an uninterrupted run, no partial or `-v1`
file stays behind, and a fault ends with one message (exit code 3), no traceback.

How a kill lands in the middle of a write, deterministically on a busy 2-core machine: the test
watches the checkpoint directory with inotify (Linux) and freezes the run's process group with
SIGSTOP the moment the save's temporary file (`.<name>.tmp<pid>`) is created or a checkpoint is
renamed into place. A frozen process cannot finish the write, so what the test then sees on disk
is the state the SIGKILL leaves: the temporary file still there means the kill came mid-write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
import torch
from llmexp.testing import FAST, OFFLINE_ENV, popen_module, run_cli
from safetensors.torch import load_file

from llmexp.checkpointing import AtomicCheckpointIO, remove_stale_partials
from llmexp.faults import TrainingFault
from llmexp.record import RunDir, read_metrics

# gpt2 with dropout (its shipped config has none), so the RNG state must be restored too; a
# checkpoint every second step gives the kill points several saves to land in.
OVERRIDES = [*FAST, "model=gpt2", "model.extra.resid_pdrop=0.1", "model.extra.embd_pdrop=0.1",
             "model.extra.attn_pdrop=0.1", "trainer.max_steps=16", "trainer.checkpoint_every_n_steps=2",
             "trainer.val_check_interval=8", "trainer.micro_batch_size=4", "trainer.grad_accum=2",
             "trainer.log_every_n_steps=1", "optim.warmup_steps=2", "data.options.num_samples=200"]
MAX_STEPS, EVERY = 16, 2


def cli(args, **kw) -> subprocess.Popen:
    """``python -m llmexp ARGS`` in a new process group (so that its whole group can be frozen
    and killed), offline, output captured."""
    if "preexec_fn" in kw:  # runs in the child before it starts: only a fresh interpreter has it
        return subprocess.Popen([sys.executable, "-m", "llmexp", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**OFFLINE_ENV, **os.environ}, **kw)
    return popen_module("llmexp", args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        start_new_session=True, **kw)


def finish(proc: subprocess.Popen, timeout: int = 600) -> Tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def assert_resumed_matches(straight: Path, resumed: Path) -> None:
    """test_resume's comparison: same weights, steps, initial and final metrics, loss log."""
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, diff
    s, r = (json.loads((d / "summary.json").read_text()) for d in (straight, resumed))
    assert r["global_step"] == s["global_step"] == MAX_STEPS
    assert r["resumed_from"] and r["initial"] == s["initial"]
    for key, value in s["final"].items():
        assert r["final"][key] == pytest.approx(value, abs=1e-6), key
    rows = [x for x in read_metrics(resumed / "metrics.csv") if "train/loss" in x]
    expected = [x for x in read_metrics(straight / "metrics.csv") if "train/loss" in x]
    assert [int(x["step"]) for x in rows] == [int(x["step"]) for x in expected] == list(range(1, MAX_STEPS + 1))
    for got, want in zip(rows, expected):
        assert got["train/loss"] == pytest.approx(want["train/loss"], abs=1e-5), got["step"]


def assert_clean(run_dir: Path) -> None:
    """Only complete checkpoints: no partial file, no `-v1` duplicate, no superseded step file."""
    names = sorted(p.name for p in RunDir(run_dir).checkpoints.iterdir())
    assert names == ["last.ckpt", f"step-{MAX_STEPS}.ckpt", "tokenizer"], names
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every faulted run must end equal to."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    r = run_cli([*OVERRIDES, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_clean(run_dir)
    return run_dir


class DirWatch:
    """inotify on a run directory and, once it exists, its checkpoints/: the names created in
    or renamed into checkpoints/, as the kernel reports them."""

    IN_MOVED_TO, IN_CREATE = 0x80, 0x100

    def __init__(self, run_dir: Path):
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.checkpoints = RunDir(run_dir).checkpoints
        self.top = self._watch(run_dir)
        self.wd = self._watch(self.checkpoints) if self.checkpoints.is_dir() else None
        self.pending: List[Tuple[int, str]] = []

    def _watch(self, directory: Path) -> int:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_CREATE | self.IN_MOVED_TO)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
        return wd

    def next(self, timeout: float) -> Optional[Tuple[int, str]]:
        """(mask, name) of the next event in checkpoints/, or None after ``timeout`` seconds."""
        while not self.pending:
            if not select.select([self.fd], [], [], timeout)[0]:
                return None
            buf, i = os.read(self.fd, 1 << 16), 0
            while i < len(buf):
                wd, mask, _, length = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16: i + 16 + length].rstrip(b"\0").decode()
                i += 16 + length
                if wd == self.top and name == "checkpoints" and self.wd is None:
                    self.wd = self._watch(self.checkpoints)  # saves before this one are not seen
                elif wd == self.wd:
                    self.pending.append((mask, name))
        return self.pending.pop(0)

    def close(self) -> None:
        os.close(self.fd)


# Where a kill lands, relative to the save of step s (step-s.ckpt, then last.ckpt).
PHASES = ("writing step-s.ckpt", "step-s.ckpt written, last.ckpt not yet", "writing last.ckpt",
          "step-s.ckpt and last.ckpt written")
_TMP = re.compile(r"^\.(step-(\d+)|last)\.ckpt\.tmp\d+$")


def run_and_kill(args, run_dir: Path, step: int, phase: str) -> dict:
    """Run the CLI and SIGKILL its process group at ``phase`` of the first save at a step >= ``step``
    (a mid-write kill the freeze comes too late for is retried at the next save). Returns what
    was killed where."""
    watch = DirWatch(run_dir)
    proc = cli(args, cwd=run_dir.parent)
    saving, misses = None, 0  # the step whose save is under way; writes that finished before the freeze
    try:
        while True:
            event = watch.next(timeout=1.0)
            if event is None:
                if proc.poll() is not None:
                    raise AssertionError(f"the run ended (rc {proc.returncode}) before {phase} at step >= {step}:\n"
                                         + proc.stderr.read()[-3000:])
                continue
            mask, name = event
            m = _TMP.match(name)
            if m and m[2]:
                saving = int(m[2])
            if saving is None or saving < step:
                continue
            created_tmp = mask & DirWatch.IN_CREATE and m
            hit = {PHASES[0]: created_tmp and m[2],
                   PHASES[1]: mask & DirWatch.IN_MOVED_TO and name == f"step-{saving}.ckpt",
                   PHASES[2]: created_tmp and m[1] == "last",
                   PHASES[3]: mask & DirWatch.IN_MOVED_TO and name == "last.ckpt"}[phase]
            if not hit:
                continue
            os.killpg(proc.pid, signal.SIGSTOP)  # frozen: the write cannot finish now
            tmp = watch.checkpoints / name
            if created_tmp and not tmp.exists():  # renamed before the freeze: try the next save
                os.killpg(proc.pid, signal.SIGCONT)
                misses += 1
                continue
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == -signal.SIGKILL
            return {"step": saving, "phase": phase, "partial": tmp if created_tmp else None, "stderr": err,
                    "misses": misses}
    finally:
        watch.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def kill_plan(seed: int) -> List[Tuple[int, str]]:
    """Seeded kill points: three save steps and three different phases (so at least one kill
    comes in the middle of a write)."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(2 * EVERY, MAX_STEPS - EVERY, EVERY), 3))
    return list(zip(steps, rng.sample(PHASES, 3)))


@pytest.mark.slow
def test_sigkill_at_seeded_points_then_resume_matches_uninterrupted(tmp_path, straight):
    plan = kill_plan(seed=16)
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # empty (a run may start in it): the watch needs it to exist
    args, kill = [*OVERRIDES, f"hydra.run.dir={run_dir}"], None
    for step, phase in plan:
        previous = kill
        kill = run_and_kill(args, run_dir, max(step, previous["step"] + EVERY) if previous else step, phase)
        if previous and previous["partial"] is not None:  # this resume removed what that kill left
            assert f"removed 1 partial file(s) a killed or failed save left in {run_dir}: " \
                   f"checkpoints/{previous['partial'].name}" in kill["stderr"]
        assert not (run_dir / "summary.json").exists()
        ckpt = RunDir(run_dir).checkpoint_to_resume()
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # the whole file loads
        newest = max(int(p.stem.split("-")[1]) for p in RunDir(run_dir).checkpoints.glob("step-*.ckpt"))
        if kill["partial"] is not None:  # frozen between creating the temporary file and renaming it
            assert kill["partial"].is_file() and phase.startswith("writing")
            # the last good checkpoint: the save before the one that was cut (of step-s.ckpt, or of
            # the last.ckpt that follows the newest step-s.ckpt)
            cut = kill["step"] if phase == PHASES[0] else newest
            assert state["global_step"] == cut - EVERY, (kill, ckpt, newest)
        else:  # killed once a rename was done (a late freeze may let the run go a little further)
            assert state["global_step"] >= (kill["step"] if phase == PHASES[3] else kill["step"] - EVERY), kill
        kill["step"] = max(kill["step"], newest)
        args = [*OVERRIDES, f"resume={run_dir}"]
    assert [k for k in plan if k[1].startswith("writing")], "a kill in the middle of a write is in the plan"
    # The last resume runs to the end, in a moved run directory (as after moving a run off a full disk).
    moved = tmp_path / "moved"
    run_dir.rename(moved)
    r = run_cli([*OVERRIDES, f"resume={moved}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    if kill["partial"] is not None:
        assert f"checkpoints/{kill['partial'].name}" in r.stderr
    run_dir = moved
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(run_dir / ckpt.relative_to(tmp_path / "run"))
    assert_clean(run_dir)
    assert_resumed_matches(straight, run_dir)


# A full disk, for real: a tmpfs of a few MiB (mounting needs root with CAP_SYS_ADMIN, as in the
# test container), filled up to room for one save (step-2.ckpt and last.ckpt) and half a file.
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small filesystem to fill (the file-size-limit test still runs)")
    if r.returncode != 0:
        pytest.skip(f"mounting a 24 MiB tmpfs is not permitted here ({r.stderr.strip()}); the disk-full test needs "
                    f"root with CAP_SYS_ADMIN (the file-size-limit test still runs)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all the free space of ``disk`` but ``leave`` bytes."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, st.f_bavail * st.f_frsize - leave)
    return filler


@pytest.mark.slow
def test_disk_full_while_a_checkpoint_is_written_keeps_the_last_good_one_which_resumes_exactly(small_disk, straight):
    size = (straight / "checkpoints" / "last.ckpt").stat().st_size
    filler = fill(small_disk, leave=2 * size + size // 2)  # the save of step 2 fits, step 4's does not
    run_dir = small_disk / "run"
    r = run_cli([*OVERRIDES, f"hydra.run.dir={run_dir}"], cwd=small_disk)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (f"cannot write a checkpoint in {ckpts}: the disk is full (no space left on the device). The run "
            f"stopped (its partial file was removed); the last good checkpoint {ckpts / 'last.ckpt'} (step 2) is "
            f"kept. Free space in {ckpts} (df -h {ckpts}), then continue with the same overrides and "
            f"resume={run_dir}") in r.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-2.ckpt", "tokenizer"]  # no partial file
    assert not (run_dir / "summary.json").exists()

    filler.unlink()  # space freed: the last good checkpoint resumes to the uninterrupted run's end
    r = run_cli([*OVERRIDES, f"resume={run_dir}"], cwd=small_disk)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "partial file" not in r.stderr
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == str(ckpts / "last.ckpt")
    assert_clean(run_dir)
    assert_resumed_matches(straight, run_dir)


def _limit_file_size(limit: int):
    def preexec():  # in the child: files it writes cannot grow past ``limit`` (EFBIG; Python ignores SIGXFSZ)
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.slow
def test_a_first_checkpoint_over_the_file_size_limit_claims_no_checkpoint(tmp_path, straight):
    """RLIMIT_FSIZE (``ulimit -f``) works without mounting anything: the first save fails, and the
    message must not claim a checkpoint, since none was written."""
    size = (straight / "checkpoints" / "last.ckpt").stat().st_size
    run_dir = tmp_path / "run"
    proc = cli([*OVERRIDES, f"hydra.run.dir={run_dir}"], cwd=tmp_path, preexec_fn=_limit_file_size(size // 2))
    rc, err = finish(proc)
    assert rc == 3 and "Traceback" not in err, err[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (f"cannot write a checkpoint in {ckpts}: the file would exceed the file-size limit of this process "
            f"(ulimit -f). The run stopped (its partial file was removed); no checkpoint had been written yet, so "
            f"there is nothing to resume. Raise the file-size limit (ulimit -f unlimited) and start the run again "
            f"in a new run directory") in err
    assert "kept" not in err
    assert [p.name for p in ckpts.iterdir()] == ["tokenizer"]  # the partial first checkpoint is gone


def test_only_the_partial_files_of_gone_processes_are_removed(tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has ended
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [ckpts / f".last.ckpt.tmp{gone}", ckpts / f".step-4.ckpt.tmp{gone}",
                 run_dir / f".summary.json.tmp{gone}", run_dir / f".loss_curve.png.tmp{gone}.png"]
        kept = [ckpts / f".last.ckpt.tmp{alive.pid}", ckpts / f".step-6.ckpt.tmp{os.getpid()}",  # being written
                ckpts / "last.ckpt", ckpts / "step-4.ckpt", ckpts / "step-4-v1.ckpt", run_dir / "config.yaml",
                run_dir / ".llmexp.lock", run_dir / ".hidden.tmp"]
        for f in stale + kept:
            f.write_bytes(b"x")
        assert sorted(remove_stale_partials(run_dir)) == sorted(stale)
        assert all(f.is_file() for f in kept) and not any(f.exists() for f in stale)
        assert remove_stale_partials(tmp_path / "no-such-run") == []
    finally:
        alive.kill()
        alive.wait()


def _save_over_the_size_limit(path: Path, limit: int = 1 << 19) -> None:
    """Save a 2 MiB checkpoint at ``path`` while this process may not write files over ``limit``
    bytes (a real EFBIG from the kernel; Python ignores SIGXFSZ)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        AtomicCheckpointIO().save_checkpoint({"global_step": 9, "w": torch.zeros(1 << 19)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_failed_save_removes_its_partial_file_and_claims_only_the_checkpoint_there_is(tmp_path):
    run_dir = tmp_path / "run"
    last = RunDir(run_dir).last_checkpoint
    with pytest.raises(TrainingFault, match="no checkpoint had been written yet") as e:
        _save_over_the_size_limit(last)
    assert e.value.exit_code == 3 and "kept" not in str(e.value)
    assert list(last.parent.iterdir()) == []

    AtomicCheckpointIO().save_checkpoint({"global_step": 4}, last)  # a good one, then a save that fails
    good = last.read_bytes()
    with pytest.raises(TrainingFault) as e:
        _save_over_the_size_limit(last)
    assert (f"cannot write a checkpoint in {last.parent}: the file would exceed the file-size limit of this "
            f"process (ulimit -f). The run stopped (its partial file was removed); the last good checkpoint "
            f"{last} (step 4) is kept. Raise the file-size limit (ulimit -f unlimited), then continue with the "
            f"same overrides and resume={run_dir}") == str(e.value)
    assert last.read_bytes() == good and [p.name for p in last.parent.iterdir()] == ["last.ckpt"]

    last.write_bytes(good[:10])  # damaged: not claimed as good
    with pytest.raises(TrainingFault, match=r"the newest checkpoint, .*last.ckpt, cannot be read") as e:
        _save_over_the_size_limit(last)
    assert "is kept" not in str(e.value)


def test_ctrl_c_while_a_step_is_saved_keeps_both_of_its_files(tmp_path):
    """Ctrl+C after step-N.ckpt was written and before last.ckpt: the run stopped with last.ckpt of
    the save before (a helper saw last at 160 beside step-180), so resume=auto redid the steps in
    between. A step's files are one save now: the interrupt takes effect once both are written."""
    import lightning as L
    from torch.utils.data import DataLoader

    from llmexp.checkpointing import RunCheckpoint

    class SigintAfterStepFile(AtomicCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            super().save_checkpoint(checkpoint, path, storage_options)
            if Path(path).name == "step-4.ckpt":
                os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl+C, just after the step file

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.w(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ckpts = tmp_path / "checkpoints"
    trainer = L.Trainer(max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        plugins=[SigintAfterStepFile()], default_root_dir=str(tmp_path),
                        callbacks=[RunCheckpoint(dirpath=str(ckpts), filename="step-{step}", every_n_train_steps=2,
                                                 save_last=True, auto_insert_metric_name=False)])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown after a KeyboardInterrupt
            trainer.fit(Tiny(), DataLoader(torch.randn(64, 2), batch_size=4))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-4.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 4
