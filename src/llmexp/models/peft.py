"""LoRA and QLoRA adapters through PEFT, with per-architecture default target modules."""

from __future__ import annotations

from typing import List

from llmexp.config.schema import ModelConfig, PeftConfig
from llmexp.errors import UserError

DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def target_modules(peft: PeftConfig, model_cfg: ModelConfig, model) -> List[str]:
    if peft.target_modules:
        return list(peft.target_modules)
    arch = getattr(model.config, "model_type", model_cfg.architecture)
    if arch not in DEFAULT_TARGETS:
        raise UserError(f"peft.target_modules: no default LoRA targets for model type {arch!r}; "
                        f"set peft.target_modules=[...] to module names of the model")
    return DEFAULT_TARGETS[arch]


def quantization_config(peft: PeftConfig):
    """4-bit NF4 for QLoRA (bitsandbytes, CUDA only); None otherwise."""
    if peft.name != "qlora":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("peft=qlora needs bitsandbytes: pip install 'llmexp[qlora]' (CUDA GPUs only)") from None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def apply_peft(model, peft: PeftConfig, model_cfg: ModelConfig, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters (the base weights freeze); unchanged for peft=none."""
    if peft.name == "none":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if peft.name == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_cfg.gradient_checkpointing)
    targets = target_modules(peft, model_cfg, model)
    found = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in found]
    if missing:
        raise UserError(f"peft.target_modules: {missing} are not modules of this model; "
                        f"some that are: {', '.join(sorted(found - {''})[:12])}")
    lora = LoraConfig(r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout, target_modules=targets,
                      task_type=task_type, fan_in_fan_out=model_cfg.architecture == "gpt2")
    return get_peft_model(model, lora)
