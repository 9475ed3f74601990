"""Helpers for testing llmexp plugins (and llmexp itself) the way users run them; llmexp's own
test suite uses these too (tests/conftest.py holds only fixtures).

``check_config`` composes and checks overrides in-process exactly like the CLI does before a
run; ``tiny_run`` trains a tiny model through the real ``python -m llmexp`` in a fresh process
(so installed plugins are discovered through their entry points) and returns its summary;
``compose``/``typed`` give the config of overrides without the command-line check, and ``train``
runs llmexp in-process on ``FAST`` settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from llmexp.record import RunDir

# Overrides for a run of a few seconds on a CPU.
TINY = ["logger=none", "trainer.progress_bar=false", "trainer.max_steps=20", "trainer.val_check_interval=10",
        "optim.warmup_steps=2", "trainer.micro_batch_size=8", "trainer.val_batch_size=16"]
# Overrides for 40-step runs on a CPU (llmexp's own end-to-end tests).
FAST = ["logger=none", "trainer.progress_bar=false", "trainer.max_steps=40", "trainer.val_check_interval=20",
        "optim.warmup_steps=5", "trainer.micro_batch_size=8", "trainer.val_batch_size=32"]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_UPDATE_DOWNLOAD_COUNTS": "0", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


def check_config(overrides: Sequence[str] = ()):
    """The typed RunConfig of ``overrides``, or the ConfigError the CLI would report (exit 2)."""
    from llmexp.overrides import check_overrides
    from llmexp.preflight import preflight

    return preflight(check_overrides(list(overrides)))


def run_cli(args: Sequence[str], cwd: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m llmexp ARGS`` in a fresh process, offline; returns the CompletedProcess."""
    full_env: Dict[str, str] = {**OFFLINE_ENV, **os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmexp", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


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
