"""One run at a time in a run directory: a second run or resume started on it is refused (exit 2,
the owner named) and the first is untouched; a killed owner leaves no lock behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llmexp.run_lock import LOCK_NAME, RunDirInUse, RunLock
from llmexp.testing import TINY, popen_module, run_cli

HOLD = "import sys, time; from llmexp.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def _holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_held_directory_is_refused_with_its_owner_and_freed_when_the_owner_is_killed(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunDirInUse, match=f"in use by another run \\(pid {holder.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path) as lock:  # SIGKILL left nothing stale: the kernel dropped the lock
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirInUse):  # and a second holder in this process is refused too
            RunLock(tmp_path).acquire()
    assert lock._fd is None
    RunLock(tmp_path).acquire().release()  # released on exit


def test_ranks_above_zero_join_their_rank_zeros_directory(tmp_path, monkeypatch):
    holder = _holder(tmp_path)
    try:
        monkeypatch.setenv("LOCAL_RANK", "1")
        RunLock(tmp_path).acquire().release()  # no lock taken, no refusal
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_resume_started_while_the_run_trains_is_refused_and_the_run_finishes(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "trainer.max_steps=300", "trainer.checkpoint_every_n_steps=10"]
    first = popen_module("llmexp", [*overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(run_dir.glob("checkpoints/*.ckpt")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, first.stderr.read()[-3000:]
    config_before = (run_dir / "config.yaml").read_text()
    second = run_cli([*overrides, f"resume={run_dir}"], cwd=tmp_path)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another run (pid {first.pid} on" in second.stderr and "Traceback" not in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert (run_dir / "config.yaml").read_text() == config_before
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 300
