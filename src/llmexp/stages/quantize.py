"""Weight-only quantization of a trained model, as a stage: the run validates the model as
trained (``initial``), quantizes it, validates again (``final``) and exports. No steps train.

- int8 / int4: torchao through transformers' ``TorchAoConfig``; the export records how to load it.
- autoround: 4-bit weights in groups, their rounding and ranges tuned block by block on windows of
  the run's training tokens (AutoRound, by the auto-round library), written in its GPTQ-packed
  format and read back through transformers, so ``final`` measures the export as users load it.
- q8_0 / q4_0: llama.cpp's GGUF block formats, written by the gguf package as ``<run dir>/model.gguf``
  and read back through transformers' GGUF loader, so ``final`` measures the file as llama.cpp gets
  it; ``model/`` holds those weights dequantized (for generate, serving and later stages).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch

from llmexp.stages.causal_lm import CausalLMStage
from llmexp.weight_groups import group_size_for, group_size_problem, layer_input_sizes


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
        group_size=group_size_for(stage_cfg.group_size, layer_input_sizes(model.config)))
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


def calibration_windows(rows, length: int, count: int) -> List[torch.Tensor]:
    """Up to ``count`` windows ``[1, length]`` cut from ``rows`` (lists of token ids) laid end to
    end: calibration text as GPTQ, AWQ and AutoRound take it (whole windows of one length; a chat
    sample is much shorter than a window, so one sample per window would calibrate on padding)."""
    stream: List[int] = []
    for row in rows:
        stream.extend(row)
        if len(stream) >= length * count:
            break
    n = min(count, len(stream) // length)
    return [torch.tensor(stream[i * length:(i + 1) * length]).unsqueeze(0) for i in range(n)]


def batch_rows(batches, pad_id: int) -> Iterator[List[int]]:
    """The token ids of each row of collated micro-batches, without padding (packed rows carry
    no attention mask: their padding is the trailing run of the pad id)."""
    for window in batches:
        for batch in window if isinstance(window, list) else [window]:
            ids = batch["input_ids"]
            lengths = (batch["attention_mask"].sum(1) if "attention_mask" in batch else
                       (ids != pad_id).long().cumsum(1).argmax(1) + 1)
            for row, n in zip(ids.tolist(), lengths.tolist()):
                yield row[:n]


TUNED = re.compile(r"quantized (?:\d+/\d+ layers in the block|(\S+?)),\s+loss iter 0: ([0-9.e+-]+) -> "
                   r"iter (\d+): ([0-9.e+-]+)")


@contextlib.contextmanager
def auto_round_tuning_losses() -> Iterator[List[Dict[str, float]]]:
    """The output error (mean squared, on the calibration windows) of each decoder layer (and of
    the output projection) as rounded to nearest and as tuned, from the line auto-round logs for
    each; its other lines (and transformers' warning that packed layers are "offloaded" when
    saved) kept off the console: the stage prints what it quantizes and the record keeps the result."""
    import warnings

    losses: List[Dict[str, float]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = TUNED.search(record.getMessage())
            if found:
                blocks = sum(1 for x in losses if x["layer"].startswith("decoder layer"))
                losses.append({"layer": found[1] or f"decoder layer {blocks}", "rounded": float(found[2]),
                               "tuned": float(found[4]), "best_step": int(found[3])})

    logger = logging.getLogger("autoround")
    capture, levels = Capture(logging.INFO), [(h, h.level) for h in logger.handlers]
    level = logger.level
    logger.setLevel(logging.INFO)
    for handler, _ in levels:
        handler.setLevel(logging.ERROR)
    logger.addHandler(capture)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*offloaded modules")
            yield losses
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)
        for handler, was in levels:
            handler.setLevel(was)


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
        elif self.cfg.stage.method == "autoround":
            self.autoround_round_trip()
            self.after_speed = generation_speed(self, self.model)
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

    autoround: Dict[str, Any] = {}

    def autoround_round_trip(self) -> None:
        """Quantize the trained model with auto-round, calibrated on windows of the run's training
        tokens, save it in auto-round's format and load that back through transformers."""
        from auto_round import AutoRound
        from transformers import AutoModelForCausalLM

        from llmexp.errors import UserError
        from llmexp.models.build import load_pretrained

        s, m = self.cfg.stage, self.cfg.model
        rows = batch_rows(self.trainer.datamodule.train_dataloader(), self.tokenizer.pad_token_id)
        windows = calibration_windows(rows, s.calibration_length, s.calibration_samples)
        if not windows:
            raise UserError(f"stage.calibration_length: the run's training data has fewer than "
                            f"{s.calibration_length} tokens, not one calibration window; fix: a smaller "
                            "stage.calibration_length, or more data")
        model = load_pretrained(AutoModelForCausalLM, m.pretrained, "model.pretrained", "a causal LM",
                                dtype=torch.float32)
        device = str(self.device) if self.device.type == "cuda" else "cpu"
        sizes = layer_input_sizes(model.config)
        wrong = group_size_problem(s.group_size, sizes)
        if wrong:  # preflight checks a local model's config.json; a hub id is read only now
            raise UserError(f"stage.group_size: {wrong[0]}; fix: {wrong[1]}")
        group = group_size_for(s.group_size, sizes)
        folder = Path(tempfile.mkdtemp(prefix="llmexp-autoround-"))
        # where auto-round offloads layers when memory runs short: its default is ./ar_work_space, in
        # the user's working directory
        os.environ.setdefault("AR_WORK_SPACE", str(folder / "offload"))
        print(f"quantizing to 4 bits ({s.method}, groups of {group}) on {len(windows)} windows of "
              f"{s.calibration_length} training tokens", file=sys.stderr, flush=True)
        with auto_round_tuning_losses() as losses, quiet_torchao():
            rounder = AutoRound(model, self.tokenizer, scheme="W4A16", group_size=group, sym=True, iters=s.iters,
                                dataset=windows, nsamples=len(windows), seqlen=s.calibration_length,
                                batch_size=min(8, len(windows)), quant_lm_head=s.embeddings, device_map=device,
                                enable_torch_compile=None if device != "cpu" else False, seed=self.cfg.trainer.seed)
            rounder.quantize_and_save(str(folder), format="auto_round")
            saved = next(config.parent for config in folder.rglob("config.json"))
            quantized = load_pretrained(AutoModelForCausalLM, saved, "model.pretrained",  # on the device whose
                                        f"the {s.method} export written from it",  # kernels it then picks
                                        **({"device_map": device} if device != "cpu" else {}))
        quantized.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = quantized.eval().to(self.device)
        # auto-round packs a layer only where its shape allows (qwen2's output projection of 513
        # rows stays float): the record says which did not shrink
        output = None if s.embeddings else quantized.get_output_embeddings()  # float as asked
        kept_float = [name for name, module in quantized.named_modules()
                      if isinstance(module, torch.nn.Linear) and module is not output]
        if kept_float:
            print(f"kept in float (auto-round cannot pack their shapes): {', '.join(kept_float)}", file=sys.stderr,
                  flush=True)
        self.autoround = {"dir": Path(saved), "folder": folder,
                          "record": {"group_size": group, "calibration_windows": len(windows),
                                     "calibration_tokens_each": s.calibration_length, "kept_float": kept_float,
                                     "layer_output_error": losses}}

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

        if self.autoround:
            facts = self.export_autoround(Path(out_dir))
        else:
            facts = super().export(out_dir)
        library = "gguf" if self.gguf else "auto-round" if self.autoround else "torchao"
        facts["quantization"] = {"method": self.cfg.stage.method, "library": library,
                                 "embeddings": self.cfg.stage.embeddings}
        if self.autoround:
            facts["quantization"].update(self.autoround["record"])
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

    def export_autoround(self, out_dir: Path) -> Dict[str, Any]:
        """model/ is the directory auto-round wrote, as ``final`` measured it."""
        from llmexp.models.export import readable_as_umask_says, redact_configs

        if self.trainer.is_global_zero:
            shutil.copytree(self.autoround["dir"], out_dir, dirs_exist_ok=True)
            shutil.rmtree(self.autoround["folder"], ignore_errors=True)
            redact_configs(out_dir)
            readable_as_umask_says(out_dir)
        return {"model_dir": str(out_dir)}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {}  # the export holds the quantized weights; nothing resumes

    @torch.no_grad()
    def training_step(self, window, batch_idx):  # pragma: no cover - max_steps is 0 (preflight)
        raise RuntimeError("stage=quantize does not train")
