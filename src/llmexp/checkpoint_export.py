"""A checkpoint of a run (finished or not) as a Hugging Face model directory, which generate, eval,
serve and a later stage's model.pretrained take as they take a run's model/:

    llmexp export runs/sft-llama/<time> --checkpoint step-400 --format hf

The model is built from what the checkpoint recorded of it (its config as trained: a pruned
model's sizes, and its generation config), LoRA adapters put on as the run put them and merged
as its export merges them (peft.merge_on_export), the checkpoint's weights loaded, and the
tokenizer the run saved as training started (checkpoints/tokenizer/) saved beside them. A reward
model gets the score scale of the validation at the checkpoint's step, when that step was
validated. A sharded checkpoint (fsdp, tp: a directory) is consolidated in this process.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from llmexp.errors import UserError
from llmexp.record import RunDir


def run_directory(target: str) -> RunDir:
    """The run ``target`` names: its directory (with config.yaml), or a file or folder inside it."""
    path = Path(target)
    for candidate in (path, path.parent, path.parent.parent):
        if RunDir(candidate).config.is_file():
            return RunDir(candidate)
    if not path.exists():
        raise UserError(f"run: {target!r} does not exist; give a run directory (one with config.yaml and "
                        f"checkpoints/)")
    raise UserError(f"run: {target!r} is not a run directory (no config.yaml); --checkpoint exports a checkpoint "
                    f"of a run: give the run's directory")


def checkpoint_file(record: RunDir, which: str) -> Path:
    """The checkpoint ``which`` names: ``step-N`` (or N, or step-N.ckpt), ``last``, or a path."""
    name = which if which.endswith(".ckpt") else f"{which}.ckpt"
    if which.isdigit():
        name = f"step-{which}.ckpt"
    path = record.checkpoints / name if re.fullmatch(r"(step-\d+|last)\.ckpt", name) else Path(which)
    if re.fullmatch(r"best-step-\d+(\.ckpt)?", Path(which).name):
        raise UserError(f"--checkpoint: {Path(which).name} holds the best validation's trained weights alone "
                        f"(trainer.keep_best); --checkpoint best exports the best the run's newest checkpoint names")
    if not path.exists():
        raise UserError(f"--checkpoint: {record.path} has no {path.name}; "
                        f"{'it has ' + available(record) if available(record) else 'it wrote no checkpoint'}"
                        f" (trainer.keep_checkpoints=N keeps the newest N step checkpoints of a run)")
    return path


def best_named_by(ckpt: Path) -> Optional[Dict[str, Any]]:
    """The best validation (trainer.keep_best's: its step and metrics) that checkpoint ``ckpt`` names, or None."""
    import torch

    try:
        saved = torch.load(ckpt / "meta.pt" if ckpt.is_dir() else ckpt, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise gone(ckpt) from None
    state = (saved.get("callbacks") or {}).get("BestValidation") or {}
    return state if state.get("step") is not None else None


def best_checkpoint(record: RunDir) -> Tuple[Path, Dict[str, Any]]:
    """--checkpoint best: the run's newest checkpoint and the best validation it names, whose
    trained weights (checkpoints/best-step-N.ckpt) replace its own."""
    from llmexp.best_model import best_file

    newest = record.checkpoint_to_resume()
    best = best_named_by(newest) if newest is not None else None
    if best is None or not best_file(record.checkpoints, best["step"]).is_file():
        raise UserError(f"--checkpoint best: {record.path} keeps no best validation's weights (trainer.keep_best=true "
                        f"with trainer.monitor keeps them); give a step checkpoint"
                        f"{' (' + available(record) + ')' if available(record) else ''}")
    return newest, best


def available(record: RunDir) -> str:
    """The checkpoints of a run, as --checkpoint names them."""
    names = [p.stem for p in record.step_checkpoints()]
    if record.last_checkpoint.exists():
        names.append("last")
    return ", ".join(names)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """A checkpoint's contents on CPU: a file, or a sharded directory (fsdp/tp) consolidated."""
    import torch

    if path.is_dir():
        if not (path / "meta.pt").is_file():
            raise UserError(f"--checkpoint: {path} is a DeepSpeed checkpoint directory; llmexp exports "
                            f"single-file and fsdp/tp (torch.distributed.checkpoint) checkpoints. DeepSpeed's "
                            f"zero_to_fp32.py in it writes a single file; the run's model/ is exported when it ends")
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        try:
            checkpoint = _load_distributed_checkpoint(path)
        except FileNotFoundError:
            raise gone(path) from None
        return {**checkpoint, "state_dict": checkpoint.get("state_dict") or checkpoint.get("model") or {}}
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise gone(path) from None
    except Exception as e:  # noqa: BLE001 - torch raises several types for a damaged file
        detail = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"--checkpoint: {path} cannot be read ({type(e).__name__}: {detail}); it is damaged or "
                        f"incomplete: give another one") from None


def run_config(record: RunDir):
    """The typed config the run trained with (its config.yaml)."""
    from omegaconf import OmegaConf

    from llmexp.config.check import typed_config

    typed, problems = typed_config(OmegaConf.load(record.config))
    if typed is None or problems:
        raise UserError(f"run: {record.config} does not describe a run this llmexp reads "
                        f"({problems[0].key if problems else 'unresolvable'}); export it with the llmexp that ran it")
    return typed


def run_tokenizer(record: RunDir):
    """The tokenizer the run trained with: saved as its training started, else its model/'s."""
    from transformers import AutoTokenizer

    for source in (record.tokenizer, record.model):
        if (source / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(source))
    raise UserError(f"run: {record.path} keeps no tokenizer (checkpoints/tokenizer/, which a run saves as its "
                    f"training starts, nor a finished run's model/); resume it (resume=<run dir>) to save one")


def refuse_what_cannot_be_exported(cfg, facts: Dict[str, Any], ckpt: Path) -> None:
    if cfg.stage.name == "quantize":
        raise UserError("--checkpoint: stage=quantize does not train; its checkpoints hold no weights, and the "
                        "quantized model is the run's model/")
    if cfg.peft.name == "qlora":
        raise UserError(f"--checkpoint: {ckpt.name} holds the 4-bit base weights of peft=qlora, which bitsandbytes "
                        f"reads on CUDA alone; the run's model/ is its merged export")
    if "model_config" not in facts:
        raise UserError(f"--checkpoint: {ckpt} was written by an llmexp that did not record the model's config in "
                        f"its checkpoints; resume the run (resume=<run dir>) to a later step, or use its model/")


def trained_model(cfg, facts: Dict[str, Any], state_dict: Dict[str, Any]):
    """The model the checkpoint holds, built as the run built it (with its LoRA adapters)."""
    import tempfile

    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              GenerationConfig)

    from llmexp.config.stages import stage_spec
    from llmexp.models.peft import apply_peft

    head = stage_spec(cfg.stage.name).head
    weights = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "config.json").write_text(facts["model_config"])
        config = AutoConfig.from_pretrained(scratch, trust_remote_code=cfg.model.trust_remote_code)
    auto = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    dtype = next((v.dtype for v in weights.values() if v.is_floating_point()), torch.float32)
    model = auto.from_config(config, dtype=dtype, attn_implementation=cfg.model.attn_implementation,
                             trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.pretrained:  # what LoRA adapters exported alone (peft.merge_on_export=false) refer to
        model.name_or_path = model.config._name_or_path = str(cfg.model.pretrained)
    model = apply_peft(model, cfg.peft, cfg.model, task_type="SEQ_CLS" if head == "score" else "CAUSAL_LM")
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        odd = result.missing_keys[:3] or result.unexpected_keys[:3]
        raise UserError(f"--checkpoint: its weights do not fit the model its run describes "
                        f"({'missing' if result.missing_keys else 'unexpected'}: {', '.join(odd)}); it belongs to "
                        f"another run")
    if facts.get("generation_config") and getattr(model, "generation_config", None) is not None:
        model.generation_config = GenerationConfig.from_dict(json.loads(facts["generation_config"]))
    return model.eval(), head


def export_checkpoint(record: RunDir, ckpt: Path, out_dir: Path, best: Optional[Dict[str, Any]] = None
                      ) -> Dict[str, Any]:
    """Write the model of checkpoint ``ckpt`` of the run ``record`` to ``out_dir`` (a new directory,
    written whole or not at all); return what it is (step, validation metrics, reward scale). With
    ``best`` (best_checkpoint's), the best validation's trained weights replace the checkpoint's."""
    import torch

    from llmexp.best_model import best_file
    from llmexp.models.export import export_model
    from llmexp.stages.preference import keep_score_scale

    cfg = run_config(record)
    checkpoint = load_checkpoint(ckpt)
    facts = checkpoint.get("llmexp") or {}
    refuse_what_cannot_be_exported(cfg, facts, ckpt)
    tokenizer = run_tokenizer(record)
    state = checkpoint.get("state_dict") or {}
    step = int(checkpoint.get("global_step", 0))
    if best is not None:  # the trained parameters at the best validation; the frozen ones are the same
        weights = torch.load(best_file(record.checkpoints, best["step"]), map_location="cpu", weights_only=True)
        state = {**state, **{f"model.{k}": v for k, v in weights["weights"].items()}}
        step, facts = int(best["step"]), {**facts, "val_step": int(best["step"]), "val_metrics": best.get("metrics")}
    model, head = trained_model(cfg, facts, state)
    validated = facts.get("val_step") == step and step > 0
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        export_model(model, tokenizer, partial, cfg.peft.merge_on_export)
        scale = keep_score_scale(partial, facts.get("val_metrics") or {}) if head == "score" and validated else {}
        partial.replace(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"step": step, "stage": cfg.stage.name, "head": head,
            "val_metrics": (facts.get("val_metrics") or {}) if validated else {}, "score_normalization": scale}


def default_out(record: RunDir, step: int, fmt: str) -> Path:
    """<run>/exports/step-N/ (hf) or <run>/exports/step-N.gguf."""
    return record.path / "exports" / (f"step-{step}" if fmt == "hf" else f"step-{step}.gguf")


def gone(path: Path) -> UserError:
    """A checkpoint removed after it was found: the run, still training, wrote a newer one and kept
    trainer.keep_checkpoints of them."""
    return UserError(f"--checkpoint: {path} was removed while it was read (the run, still training, keeps its "
                     f"newest trainer.keep_checkpoints checkpoints): give a newer one")


def step_of(ckpt: Path) -> int:
    from llmexp.record import checkpoint_step

    try:
        return checkpoint_step(ckpt)
    except FileNotFoundError:
        raise gone(ckpt) from None
    except Exception:  # noqa: BLE001 - said by load_checkpoint with the fix
        load_checkpoint(ckpt)
        raise


def described(facts: Dict[str, Any]) -> str:
    """How the export was validated, for its one line of output."""
    metrics = facts.get("val_metrics") or {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())
                      if k in ("val/loss", "val/task_score", "val/accuracy", "val/reward"))
    if facts["head"] == "score" and not facts.get("score_normalization"):
        return "; its step was not validated, so its scores are not normalized (the reward stages use them raw)"
    return f"; validated at its step: {shown}" if shown else ""


def resolve(target: str, which: str) -> Tuple[RunDir, Path, int, Optional[Dict[str, Any]]]:
    """(the run, its checkpoint, the step exported, the best validation for --checkpoint best)."""
    record = run_directory(target)
    if which == "best":
        ckpt, best = best_checkpoint(record)
        return record, ckpt, int(best["step"]), best
    ckpt = checkpoint_file(record, which)
    return record, ckpt, step_of(ckpt), None


def out_directory(given: Optional[str], record: RunDir, step: int, fmt: str) -> Path:
    """The directory (hf) to write: --out, else the default; an existing one is kept (refused)."""
    out = Path(given) if given else default_out(record, step, fmt)
    if out.exists():
        raise UserError(f"--out: {str(out)!r} exists and is kept; give another --out or remove it")
    if given and not out.parent.is_dir():
        raise UserError(f"--out: directory {str(out.parent)!r} does not exist; create it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
