"""Shared fixtures: compose configs like the CLI does, shrink runs for CPU, run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small, fast settings for end-to-end runs on a CPU.
FAST = ["logger=none", "trainer.progress_bar=false", "trainer.max_steps=40", "trainer.val_check_interval=20",
        "optim.warmup_steps=5", "trainer.micro_batch_size=8", "trainer.val_batch_size=32"]


@pytest.fixture(autouse=True, scope="session")
def _llmexp_cache(tmp_path_factory):
    os.environ["LLMEXP_CACHE"] = str(tmp_path_factory.mktemp("llmexp-cache"))


def compose(overrides: Sequence[str] = ()):
    """The config the CLI would compose for ``overrides`` (no Hydra run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from llmexp.paths import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def typed(overrides: Sequence[str] = ()):
    from llmexp.preflight import preflight

    return preflight(compose(overrides))


def run_cli(args: List[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """``python -m llmexp ARGS`` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmexp", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def train(tmp_path: Path, overrides: Sequence[str] = (), name: str = "run") -> Path:
    """Run llmexp in-process on a tiny config; return the run directory."""
    from llmexp.run import run

    run_dir = tmp_path / name
    run(compose([*FAST, *overrides]), run_dir=run_dir)
    return run_dir
