"""Shared helpers for the benchmarks: the machine, results files, in-process llmexp runs."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
                   "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(key, value)


def machine() -> Dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform()}


def save(name: str, result: Dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")
    return path


def llmexp_run(overrides: List[str], callbacks=()) -> Dict[str, Any]:
    """Train in-process with llmexp; return its summary.json."""
    from llmexp.testing import compose

    from llmexp.run import run

    run_dir = Path(tempfile.mkdtemp(prefix="llmexp-bench-")) / "run"
    run(compose(["logger=none", "trainer.progress_bar=false", *overrides]), run_dir=run_dir, callbacks=callbacks)
    return json.loads((run_dir / "summary.json").read_text())


def sft_policy(model: List[str]) -> str:
    """``model`` after llmexp's 150-step SFT on the bundled arithmetic chats (its exported model
    directory): a policy that already answers, as RL starts from in practice."""
    summary = llmexp_run([*model, "stage=sft", "trainer.max_steps=150", "trainer.val_check_interval=null",
                          "trainer.limit_val_batches=1"])
    return summary["model_dir"]


def trl_clock():
    """A transformers callback timing the training loop (on_train_begin .. on_train_end)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.start

    return Clock()


def lightning_clock():
    """A Lightning callback timing the same span (on_train_start .. on_train_end)."""
    from lightning.pytorch.callbacks import Callback

    class Clock(Callback):
        def on_train_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    return Clock()
