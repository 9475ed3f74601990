"""Write a run's model in Hugging Face format: loadable by plain transformers, no llmexp needed."""

from __future__ import annotations

from pathlib import Path


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def export_model(model, tokenizer, out_dir: Path, merge_adapters: bool = True):
    """Save weights (safetensors), config, generation config and tokenizer into ``out_dir``.

    LoRA adapters are merged into the base weights when ``merge_adapters`` (the export is then a
    plain model); otherwise only the adapter is saved, referring to its base model. Returns the
    model as saved (merged when merged).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model) and merge_adapters:
        model = model.merge_and_unload()
    elif is_peft_model(model):  # the adapters refer to their base: by an absolute path when it is local
        for adapter in model.peft_config.values():
            base = adapter.base_model_name_or_path
            if base and Path(base).is_dir():
                adapter.base_model_name_or_path = str(Path(base).resolve())
    model.config.use_cache = True
    model.save_pretrained(str(out_dir), safe_serialization=True)
    model.config.use_cache = False
    tokenizer.save_pretrained(str(out_dir))
    redact_configs(out_dir)
    readable_as_umask_says(out_dir)
    return model


def readable_as_umask_says(out_dir: Path) -> None:
    """Files of the export get the permissions the user's umask gives new files (0644 under
    0022). safetensors >= 0.8 writes model.safetensors through a private temporary file (0600):
    the one file of the export that a serving account or a colleague could not read."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    wanted = 0o666 & ~mask
    for path in Path(out_dir).iterdir():
        if path.is_file() and (path.stat().st_mode & 0o777) != wanted and not (path.stat().st_mode & 0o111):
            path.chmod(wanted)


def redact_configs(out_dir: Path) -> None:
    """Secrets that reached the model's config (model.extra.<...token/key...>, the value of
    HF_TOKEN) are written as *** there too, as in every other file of the run record."""
    import json

    from llmexp.secrets import redact

    for name in ("config.json", "generation_config.json", "adapter_config.json"):
        path = Path(out_dir) / name
        if path.is_file():
            saved = json.loads(path.read_text())
            clean = redact(saved)
            if clean != saved:
                path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
