"""Fixtures only: offline environment, a per-session cache. The helpers tests share
(compose, typed, run_cli, train, FAST) are llmexp.testing's, the module plugin authors use."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _llmexp_cache(tmp_path_factory):
    os.environ["LLMEXP_CACHE"] = str(tmp_path_factory.mktemp("llmexp-cache"))
