"""Shared helpers for the benchmarks: the machine, results files, in-process llmexp runs."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

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


MULTINOMIAL = "llmexp drawing each token with torch.multinomial"


def with_multinomial_draw(side: Callable[[], dict]) -> Callable[[], dict]:
    """``side`` with the rollout sampler drawing each token by torch.multinomial, as it did before
    it inverted each row's cumulative distribution: the ablation row of that change."""
    def run() -> dict:
        import torch

        from llmexp import sampler

        drawn = sampler.draw
        sampler.draw = lambda probs: torch.multinomial(probs, 1).squeeze(1)
        try:
            return side()
        finally:
            sampler.draw = drawn

    return run


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


def rollout_arguments(doc: str, **defaults: int):
    """The command line of a rollout benchmark: its own numbers (``defaults``, name -> default)
    plus --repeats, --init and --no-ablations."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--init", nargs="+", default=["sft", "random"], choices=["sft", "random"])
    ap.add_argument("--no-ablations", dest="ablations", action="store_false")
    return ap


def best_of_interleaved(sides: Dict[str, Any], repeats: int, baseline: str, ratio_key: str) -> Dict[str, dict]:
    """Run every side (name -> no-argument callable returning a dict with responses_per_second)
    ``repeats`` times, interleaved so that load on the machine hits every side alike; keep each
    side's best run and its ratio to ``baseline``'s under ``ratio_key``."""
    runs: Dict[str, List[dict]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            runs[name].append(side())
    out = {name: max(r, key=lambda x: x["responses_per_second"]) for name, r in runs.items()}
    for r in out.values():
        r[ratio_key] = r["responses_per_second"] / out[baseline]["responses_per_second"]
    return out


def print_rollout_table(results: Dict[str, Dict[str, dict]], ratio_key: str, label: str, parts: List[str]) -> None:
    """One row per starting point and side: responses/s, the ratio, and llmexp's time split."""
    print(f"\n{'start':7} {'side':56} {'responses/s':>12} {label:>8}  split (s): {' / '.join(parts)}")
    for init, rows in results.items():
        for name, r in rows.items():
            split = r.get("time_split")
            seconds = " / ".join(f"{split.get(p + '_seconds', 0):.1f}" for p in parts) if split else ""
            print(f"{init:7} {name:56} {r['responses_per_second']:12.1f} {r[ratio_key]:7.2f}x  {seconds}")
