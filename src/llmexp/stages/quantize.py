"""Weight-only quantization of a trained model, as a stage: the run validates the model as
trained (``initial``), quantizes it, validates again (``final``) and exports. No steps train.

- int8 / int4: torchao through transformers' ``TorchAoConfig``; the export records how to load it.
- q8_0 / q4_0: llama.cpp's GGUF block formats, written by the gguf package as ``<run dir>/model.gguf``
  and read back through transformers' GGUF loader, so ``final`` measures the file as llama.cpp gets
  it; ``model/`` holds those weights dequantized (for generate, serving and later stages).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

from llmexp.stages.causal_lm import CausalLMStage


@contextlib.contextmanager
def quiet_torchao():
    """torchao's import logs a warning for each optional CUDA kernel library a CPU build cannot
    load, and torch's pytree one per enum it registers: nothing a user can act on."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def torchao_config(stage_cfg, model):
    """transformers' TorchAoConfig of ``stage.method`` for ``model``; with ``stage.embeddings`` the
    input embedding in int8 rows and the output projection as the other linear layers.

    Each linear layer's weight is named, not torchao's ``_default`` key: transformers 5.25 applies
    ``_default`` to every parameter of a linear layer, biases too, and a quantized bias fails the
    forward pass (qwen2's attention projections have biases). (transformers'
    untie_embedding_weights=True corrupts the output here, so embeddings stay as the checkpoint
    ties them.)"""
    import warnings

    import torch
    from torchao.quantization import FqnToConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis
    from transformers import TorchAoConfig

    scheme = Int8WeightOnlyConfig() if stage_cfg.method == "int8" else Int4WeightOnlyConfig(
        group_size=stage_cfg.group_size)
    if not stage_cfg.embeddings:
        return TorchAoConfig(scheme)
    embedding = model.get_input_embeddings()
    per_module = {f"{name}.weight": scheme for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear)}
    per_module.update({name: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
                       for name, module in model.named_modules() if module is embedding})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TorchAoConfig(FqnToConfig(per_module), include_input_output_embeddings=True,
                             untie_embedding_weights=False)


class QuantizeStage(CausalLMStage):
    """Validation loss and the task metric of the model before and after quantization."""

    loss_on_targets_only = True

    def configure_optimizers(self):
        return None  # nothing trains

    gguf: Dict[str, Any] = {}

    def on_fit_end(self) -> None:
        """Swap in the quantized model."""
        from llmexp.config.schema import GGUF_METHODS
        from llmexp.stages.compression import describe, generation_speed

        self.before = describe(self, self.model, Path(self.cfg.model.pretrained))
        if self.cfg.stage.method in GGUF_METHODS:
            self.gguf_round_trip(Path(self.cfg.model.pretrained))
            self.after_speed = None  # the file runs in llama.cpp; here its weights run dequantized
        else:
            self.torchao_quantized()
            self.after_speed = generation_speed(self, self.model)

    def gguf_round_trip(self, model_dir: Path) -> None:
        """Write the trained model as GGUF in the stage's block format, read the file back through
        transformers' GGUF loader (dequantizing it) and run those weights in the trained model."""
        from transformers import AutoModelForCausalLM

        from llmexp.export_gguf import write_gguf
        from llmexp.models.build import load_pretrained

        folder = Path(tempfile.mkdtemp(prefix="llmexp-gguf-"))
        facts = write_gguf(model_dir, folder / "model.gguf", self.cfg.stage.method, self.cfg.stage.embeddings)
        read = load_pretrained(AutoModelForCausalLM, folder, "model.pretrained", "the GGUF file written from it",
                               gguf_file="model.gguf", dtype=torch.float32)
        self.model.load_state_dict({k: v.to(self.device) for k, v in read.state_dict().items()})
        self.model.eval()
        self.gguf = {**facts, "file": folder / "model.gguf"}

    def torchao_quantized(self) -> None:
        """The model loaded from the trained one's directory by transformers, quantized by torchao."""
        from transformers import AutoModelForCausalLM

        from llmexp.models.build import load_pretrained

        m = self.cfg.model
        with quiet_torchao():
            config = torchao_config(self.cfg.stage, self.model)
        quantized = load_pretrained(AutoModelForCausalLM, m.pretrained, "model.pretrained", "a causal LM",
                                    quantization_config=config,
                                    attn_implementation=m.attn_implementation)
        quantized.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = quantized.eval().to(self.device)

    def export(self, out_dir) -> Dict[str, Any]:
        from llmexp.stages.compression import compression_record

        facts = super().export(out_dir)
        facts["quantization"] = {"method": self.cfg.stage.method, "library": "gguf" if self.gguf else "torchao",
                                 "embeddings": self.cfg.stage.embeddings}
        if self.trainer.is_global_zero:
            weight_bytes = None
            if self.gguf:
                gguf_path = Path(out_dir).parent / "model.gguf"
                shutil.move(str(self.gguf["file"]), str(gguf_path))
                shutil.rmtree(self.gguf["file"].parent, ignore_errors=True)
                weight_bytes = self.gguf["weight_bytes"]
                facts["quantization"].update(gguf=str(gguf_path), gguf_bytes=gguf_path.stat().st_size,
                                             tensor_types=self.gguf["tensor_types"])
            facts["compression"] = compression_record(self.before, self.model, Path(out_dir), self.after_speed,
                                                      weight_bytes_after=weight_bytes)
        return facts

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {}  # the export holds the quantized weights; nothing resumes

    @torch.no_grad()
    def training_step(self, window, batch_idx):  # pragma: no cover - max_steps is 0 (preflight)
        raise RuntimeError("stage=quantize does not train")
