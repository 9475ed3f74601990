"""Exactness: packed rows compute what unpacked samples compute; 1x8 and 8x1 micro-batches agree."""

from __future__ import annotations

import pytest
import torch
from llmexp.testing import typed

from llmexp.data.collate import collate_lm
from llmexp.data.module import StageDataModule, load_examples
from llmexp.data.packing import pack
from llmexp.losses import token_nll_sum
from llmexp.models.tokenizer import load_tokenizer
from llmexp.stages import stage_class
from llmexp.training import build_trainer


def _stage(overrides):
    cfg = typed(["logger=none", "trainer.progress_bar=false", *overrides])
    tok = load_tokenizer(None, None)
    torch.manual_seed(0)
    return cfg, stage_class(cfg.stage.name).create(cfg, tok)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm of the difference relative to the norm (fp32 sums in another order differ ~1e-7)."""
    return float((a - b).norm() / a.norm().clamp(min=1e-12))


def _nll_and_grads(model, batch):
    model.zero_grad()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    total, count = token_nll_sum(model(**inputs, use_cache=False).logits, batch["labels"])
    total.backward()
    return total.detach(), int(count), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral"])
@pytest.mark.parametrize("stage", ["sft", "pretrain"])
def test_packed_equals_unpacked_loss_and_gradients(arch, stage):
    cfg, module = _stage([f"model={arch}", f"stage={stage}"])
    prepared = load_examples(cfg.data, stage)
    encode = module.encoder(prepared.format)
    samples = [encode(prepared.train[i]) for i in range(24)]
    pad = module.tokenizer.pad_token_id
    unpacked = collate_lm(samples, pad)
    rows = pack(samples, capacity=128)
    assert len(rows) < len(samples) / 3  # really packed: several samples per row
    packed = collate_lm(rows, pad)
    assert "attention_mask" not in packed and "position_ids" in packed
    assert packed["loss_weight"] == unpacked["loss_weight"]
    model = module.model.float().eval()  # no dropout: both layouts must see the same network
    a_loss, a_n, a_grads = _nll_and_grads(model, unpacked)
    b_loss, b_n, b_grads = _nll_and_grads(model, packed)
    assert a_n == b_n == unpacked["loss_weight"]
    assert torch.allclose(a_loss, b_loss, rtol=1e-5), (a_loss, b_loss)
    for name in a_grads:
        assert _rel_diff(a_grads[name], b_grads[name]) < 1e-5, name


class _GradCapture:
    """Records the gradients the optimizer is about to apply at each step."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class Capture(Callback):
            def __init__(self):
                self.grads, self.losses = [], []

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                self.grads.append({n: p.grad.clone() for n, p in pl_module.model.named_parameters()})

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

        return Capture()


def _one_run(tmp_path, micro, accum, packing=False):
    cfg, module = _stage([f"trainer.micro_batch_size={micro}", f"trainer.grad_accum={accum}",
                          "trainer.max_steps=1", "optim.warmup_steps=0", "trainer.val_check_interval=null",
                          "trainer.gradient_clip_val=null", f"data.packing={str(packing).lower()}"])
    data = StageDataModule(load_examples(cfg.data, "sft"), cfg.data, cfg.trainer, module)
    capture = _GradCapture()
    trainer = build_trainer(cfg, tmp_path / f"{micro}x{accum}", loggers=[], extra_callbacks=[capture])
    trainer.fit(module, datamodule=data)
    return capture, module


def test_gradient_accumulation_1x8_equals_8x1(tmp_path):
    one, m1 = _one_run(tmp_path, micro=8, accum=1)
    eight, m8 = _one_run(tmp_path, micro=1, accum=8)
    assert len(one.grads) == len(eight.grads) == 1
    assert one.losses[0] == pytest.approx(eight.losses[0], rel=1e-6)
    for name, g in one.grads[0].items():
        assert _rel_diff(g, eight.grads[0][name]) < 1e-5, name
    # The sum over micro-batches is normalised by the window's token count, not averaged per
    # micro-batch: the gradient is that of the mean over all target tokens of the 8 samples.
    assert max(g.abs().max() for g in one.grads[0].values()) > 1e-3
