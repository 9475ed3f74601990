"""An exclusive lock on a run directory, so that two runs (or two resumes) started on one
directory at the same moment cannot interleave their checkpoints, metrics and summary.

The lock is an ``flock`` on ``<run dir>/.llmexp.lock``: the kernel drops it when its process ends,
however it ends (a SIGKILLed run leaves no stale lock to clean up before resuming). The file
holds the owner's pid, host and start time, so that a refused run can name it. Ranks > 0 of a
distributed run join their rank 0's directory and take no lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from llmexp.errors import UserError

LOCK_NAME = ".llmexp.lock"


def distributed_child() -> bool:
    """A process Lightning (or torchrun) started for rank > 0 joins its parent's run directory."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("RANK", "0") != "0"


class RunDirInUse(UserError):
    """Another live process holds the run directory."""


class RunLock:
    """``with RunLock(run_dir):`` holds the directory for this process (a no-op on ranks > 0)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl

        if distributed_child() or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise RunDirInUse(f"{self.path.parent} is in use by another run ({_describe(owner)}); wait for it to "
                              f"end, or choose another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _describe(owner: str) -> str:
    try:
        o = json.loads(owner)
        return f"pid {o['pid']} on {o['host']}, since {o['since']}"
    except (ValueError, KeyError, TypeError):
        return "its owner is starting"
