"""Helpers for testing llmexp plugins (and llmexp itself) the way users run them; llmexp's own
test suite uses these too (tests/conftest.py holds only fixtures).

``check_config`` composes and checks overrides in-process exactly like the CLI does before a
run; ``tiny_run`` trains a tiny model through the real ``python -m llmexp`` in a fresh process
(so installed plugins are discovered through their entry points) and returns its summary;
``compose``/``typed`` give the config of overrides without the command-line check, and ``train``
runs llmexp in-process on ``FAST`` settings; ``train_in_subprocess`` trains in a fresh process group
and can SIGKILL it after a given step (to test resuming); ``run_module`` runs any ``python -m``
command to completion and ``popen_module`` starts one alongside the test (a server, a run to kill).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

from llmexp.env import OFFLINE_VARS, QUIET_VARS
from llmexp.record import RunDir

# Overrides for a run of a few seconds on a CPU. The task metric greedily answers 16 held-out
# prompts instead of the bundled skill's 620 (155 took a third of such a run: 2.3 s -> 1.6 s);
# a test of what the metric says uses the shipped task.max_prompts.
TINY = ["logger=none", "trainer.progress_bar=false", "trainer.max_steps=20", "trainer.val_check_interval=10",
        "optim.warmup_steps=2", "trainer.micro_batch_size=8", "trainer.val_batch_size=16", "task.max_prompts=16"]
# Overrides for 40-step runs on a CPU (llmexp's own end-to-end tests), with TINY's task metric.
FAST = ["logger=none", "trainer.progress_bar=false", "trainer.max_steps=40", "trainer.val_check_interval=20",
        "optim.warmup_steps=5", "trainer.micro_batch_size=8", "trainer.val_batch_size=32", "task.max_prompts=16"]
# What every offline ``python -m llmexp`` sets before its imports (llmexp.env), plus offline W&B: a
# test process starts with it, so an in-process run changes nothing a later forked command reads.
OFFLINE_ENV = {**OFFLINE_VARS, **QUIET_VARS, "WANDB_MODE": "offline"}


def check_config(overrides: Sequence[str] = ()):
    """The typed RunConfig of ``overrides``, or the ConfigError the CLI would report (exit 2)."""
    from llmexp.overrides import check_overrides
    from llmexp.preflight import preflight

    return preflight(check_overrides(list(overrides)))


def run_module(module: str, args: Sequence[str], cwd: Optional[Path] = None,
               env: Optional[Mapping[str, str]] = None, timeout: int = 600,
               script: bool = False) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` (with ``script``: ``python MODULE ARGS``) in a fresh process and
    session, offline; returns the CompletedProcess. The process is forked from llmexp.forkserver,
    which has the heavy libraries imported already (``LLMEXP_TEST_FORKSERVER=0``: a fresh
    interpreter every time)."""
    from llmexp.forkserver import shared_server

    base_env: Dict[str, str] = {**OFFLINE_ENV, **os.environ}
    full_env: Dict[str, str] = {**base_env, **(env or {})}
    server = shared_server(base_env, full_env)
    if server is not None:
        return server.run(module, args, cwd=cwd, env=full_env, timeout=timeout, script=script)
    return subprocess.run([sys.executable, *([] if script else ["-m"]), module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


def popen_module(module: str, args: Sequence[str], env: Optional[Mapping[str, str]] = None, script: bool = False,
                 **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen([python, "-m", MODULE, *ARGS], env=..., **popen_kwargs)`` (offline), for a
    command the test runs alongside (a server, a run to interrupt): forked from llmexp.forkserver
    like run_module's, or a fresh interpreter where that would not be faithful."""
    from llmexp.forkserver import shared_server

    base_env: Dict[str, str] = {**OFFLINE_ENV, **os.environ}
    full_env: Dict[str, str] = {**base_env, **(env or {})}
    server = shared_server(base_env, full_env, busy_ok=True)
    if server is not None:
        return server.popen(module, args, script=script, env=full_env, **popen_kwargs)
    return subprocess.Popen([sys.executable, *([] if script else ["-m"]), module, *args], env=full_env,
                            **popen_kwargs)


def interrupted_once_checkpointed(args: Sequence[str], run_dir: Path, timeout: float = 300,
                                  ready: Optional[Callable[[], bool]] = None, sig: int = 0) -> Tuple[int, str]:
    """(exit code, stderr) of ``python -m llmexp ARGS`` sent Ctrl+C (SIGINT to its process group, as a
    terminal sends it to every rank; or ``sig``) once ``run_dir`` holds a checkpoint (or once ``ready()``)."""
    import signal
    import time

    ready = ready or (lambda: bool(list((Path(run_dir) / "checkpoints").glob("*.ckpt"))))
    proc = popen_module("llmexp", args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        start_new_session=True)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None:
        assert time.time() < deadline, f"not ready within {timeout} s"
        time.sleep(0.2)
    os.killpg(proc.pid, sig or signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def run_cli(args: Sequence[str], cwd: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m llmexp ARGS`` in a fresh process, offline (see run_module)."""
    return run_module("llmexp", args, cwd=cwd, env=env, timeout=timeout)


def tiny_run(run_dir: Path, overrides: Sequence[str] = (), env: Optional[Mapping[str, str]] = None,
             timeout: int = 600) -> dict:
    """Train a tiny model into the new directory ``run_dir``; return its summary.json.

    Raises AssertionError with the end of stderr when the run fails.
    """
    run_dir = Path(run_dir).resolve()
    r = run_cli([*TINY, *overrides, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, env=env, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"llmexp exited with {r.returncode}:\n{r.stderr[-4000:]}")
    return RunDir(run_dir).summary()


def compose(overrides: Sequence[str] = ()):
    """The config Hydra composes for ``overrides`` (no command-line check, no run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from llmexp.paths import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def typed(overrides: Sequence[str] = ()):
    """The preflight-checked RunConfig of ``overrides`` (ConfigError lists every problem)."""
    from llmexp.preflight import preflight

    return preflight(compose(overrides))


def train(tmp_path: Path, overrides: Sequence[str] = (), name: str = "run") -> Path:
    """Run llmexp in-process on ``FAST`` settings plus ``overrides``; return the run directory."""
    from llmexp.run import run

    run_dir = Path(tmp_path) / name
    run(compose([*FAST, *overrides]), run_dir=run_dir)
    return run_dir


_KILLABLE = textwrap.dedent('''
    import os, signal, sys
    from lightning.pytorch.callbacks import Callback
    from llmexp.testing import compose
    from llmexp.run import Interrupted, run

    class SignalAt(Callback):
        """Send this process group a signal right after optimizer step N: SIGKILL from every rank
        (no cleanup, no final save), SIGINT from rank 0 (a terminal's Ctrl+C, once to each rank)."""
        def __init__(self, step, sig):
            self.step, self.sig = step, sig
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step and (self.sig == signal.SIGKILL or trainer.is_global_zero):
                os.killpg(os.getpgrp(), self.sig)

    overrides, run_dir, at, sig = sys.argv[1].split("|"), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    try:
        run(compose(overrides), run_dir=run_dir, callbacks=[SignalAt(at, sig)] if at else [])
    except Interrupted as e:
        sys.exit(f"{e}")
''')


def train_in_subprocess(overrides: Sequence[str], run_dir: Path, kill_at: int = 0, interrupt_at: int = 0,
                        timeout: int = 600) -> subprocess.CompletedProcess:
    """Train as ``overrides`` say into ``run_dir`` in a fresh process group; with ``kill_at`` the
    whole group is SIGKILLed right after that optimizer step (returncode -9); with ``interrupt_at``
    it gets Ctrl+C's SIGINT there (returncode 1, the run's message in stderr). A script file, not
    ``-c``, so that Lightning can relaunch it for each rank of a distributed run."""
    import signal

    script = Path(tempfile.mkdtemp(prefix="llmexp-test-")) / "train_or_die.py"
    script.write_text(_KILLABLE)
    at, sig = (interrupt_at, signal.SIGINT) if interrupt_at else (kill_at, signal.SIGKILL)
    return run_module(str(script), ["|".join(overrides), str(run_dir), str(at), str(int(sig))], timeout=timeout,
                      script=True)
