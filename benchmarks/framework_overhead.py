"""llmexp's training step against a plain PyTorch loop on the same model and the same batches.

Both train the same freshly initialised model (same seed) on the same windows of micro-batches
(llmexp's data module produces them for both), with the same AdamW, schedule, clipping and
token-normalised loss. Time is wall time from the start of step ``--skip`` to the end of the last
step, so start-up is excluded on both sides and everything between steps is included.

    python benchmarks/framework_overhead.py [--steps 120]
"""

from __future__ import annotations

import argparse
import math
import time

from common import save

OVERRIDES = ["model.hidden_size=128", "model.num_layers=4", "model.intermediate_size=512",
             "trainer.micro_batch_size=8", "trainer.grad_accum=2", "trainer.val_check_interval=null",
             "trainer.limit_val_batches=1", "logger=none", "trainer.progress_bar=false"]


def _setup(steps: int):
    import lightning as L

    from llmexp.preflight import preflight
    from llmexp.testing import compose
    from llmexp.data.module import StageDataModule, load_examples
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.stages import stage_class

    cfg = preflight(compose([*OVERRIDES, f"trainer.max_steps={steps}"]))
    tok = load_tokenizer(None, None)
    L.seed_everything(cfg.trainer.seed, verbose=False)
    stage = stage_class("sft").create(cfg, tok)
    data = StageDataModule(load_examples(cfg.data, "sft"), cfg.data, cfg.trainer, stage)
    data.setup()
    return cfg, stage, data


def plain_loop(steps: int, skip: int) -> float:
    import torch

    from llmexp.losses import token_nll_sum
    from llmexp.optim import build_optimizer

    cfg, stage, data = _setup(steps)
    model = stage.model.train()
    opt, sched = build_optimizer(model, cfg.optim, steps)
    it = iter(data.train_dataloader())
    start = None
    for step in range(steps):
        if step == skip:
            start = time.perf_counter()
        try:
            window = next(it)
        except StopIteration:
            it = iter(data.train_dataloader())
            window = next(it)
        weight = sum(mb["loss_weight"] for mb in window)
        for mb in window:
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
            loss, _ = token_nll_sum(logits, mb["labels"])
            (loss / weight).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return time.perf_counter() - start


def llmexp_loop(steps: int, skip: int) -> float:
    from lightning.pytorch.callbacks import Callback

    from llmexp.training import build_trainer

    class Clock(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == skip:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    cfg, stage, data = _setup(steps)
    clock = Clock()
    import tempfile

    trainer = build_trainer(cfg, tempfile.mkdtemp(), loggers=[], extra_callbacks=[clock])
    trainer.fit(stage, datamodule=data)
    return clock.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    plain, ours = [], []
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both
        plain.append(plain_loop(args.steps, args.skip))
        ours.append(llmexp_loop(args.steps, args.skip))
    best_plain, best_ours = min(plain), min(ours)
    overhead = best_ours / best_plain - 1.0
    print(f"plain PyTorch {best_plain:.3f}s   llmexp {best_ours:.3f}s   overhead {overhead * 100:+.1f}% "
          f"(target <= +5%)  over {args.steps - args.skip} steps, best of {args.repeats}")
    save("framework_overhead", {"settings": vars(args), "overrides": OVERRIDES, "plain_seconds": plain,
                                "llmexp_seconds": ours, "overhead": overhead, "target": 0.05,
                                "ms_per_step": {"plain": 1000 * best_plain / (args.steps - args.skip),
                                                "llmexp": 1000 * best_ours / (args.steps - args.skip)}})
    assert math.isfinite(overhead)


if __name__ == "__main__":
    main()
