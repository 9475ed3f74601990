"""Build the model a run trains: pretrained weights, or initialised from the architecture.

Small configs (hidden 64, 2 layers) make CPU runs practical; the same code loads a hub id or a
local directory (e.g. another run's ``model/``) when ``model.pretrained`` is set.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from llmexp.config.schema import ModelConfig
from llmexp.errors import UserError

# llmexp's size keys -> each architecture's config keys.
SIZE_KEYS: Dict[str, Dict[str, str]] = {
    "gpt2": {"hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
             "intermediate_size": "n_inner", "max_position_embeddings": "n_positions"},
    "default": {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
                "intermediate_size": "intermediate_size", "max_position_embeddings": "max_position_embeddings"},
}


def architecture_config(cfg: ModelConfig, tokenizer, **overrides: Any) -> Any:
    """A transformers config for ``cfg.architecture`` sized by ``cfg``, fitted to the tokenizer."""
    from transformers import AutoConfig

    keys = SIZE_KEYS.get(cfg.architecture, SIZE_KEYS["default"])
    sizes = {hf: getattr(cfg, ours) for ours, hf in keys.items() if getattr(cfg, ours) is not None}
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
               "bos_token_id": tokenizer.bos_token_id}
    return AutoConfig.for_model(cfg.architecture, vocab_size=len(tokenizer), **sizes, **special,
                                  **cfg.extra, **overrides)


def local_model_type(path) -> Optional[str]:
    """The model type in a local model directory's config.json (None for a hub id or an unreadable config)."""
    return local_config(path).get("model_type")


def local_config(path) -> dict:
    """A local model directory's config.json ({} for a hub id or an unreadable config)."""
    import json
    import os
    from pathlib import Path

    try:
        config = json.loads((Path(os.path.expanduser(str(path))) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def pretrained_sizes(config: dict) -> dict:
    """model.<size key> -> the value a local model's config.json holds (gpt2's null n_inner is 4
    x n_embd); keys it does not hold are left out."""
    keys = SIZE_KEYS.get(config.get("model_type"), SIZE_KEYS["default"])
    sizes = {ours: config[hf] for ours, hf in keys.items() if isinstance(config.get(hf), int)}
    if config.get("model_type") == "gpt2":
        sizes["num_kv_heads"] = None  # one per head: gpt2 has no grouped-query attention
        if "intermediate_size" not in sizes and "hidden_size" in sizes:
            sizes["intermediate_size"] = 4 * sizes["hidden_size"]
    return sizes


def check_not_a_reward_model(path, key: str) -> None:
    """A reward model's directory loads as a causal LM with a random lm_head (transformers only
    warns): refuse it where a language model is meant."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():
        return
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return
    scorers = [a for a in architectures if a.endswith("ForSequenceClassification")]
    if scorers:
        raise UserError(f"{key}: {str(path)!r} is a reward model ({scorers[0]}), not a language model; give "
                        f"a policy run's model (sft, dpo, ppo, grpo), or use it as stage.reward.model=")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_pretrained(auto, path, key: str, what: str, **kwargs):
    """``auto.from_pretrained(path)``, with an unreadable directory or damaged weights reported as
    a UserError naming ``key`` (not a traceback from deep inside safetensors)."""
    from safetensors import SafetensorError

    try:
        return auto.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0][:300]
        damaged = isinstance(e, (SafetensorError, EOFError, RuntimeError))
        raise UserError(f"{key}: cannot load {what} from {str(path)!r}: {detail}"
                        + ("; its weights file is damaged or incomplete: copy the model again or export it anew"
                           if damaged else "")) from None


class _NewScoreHeadReport:
    """A logging filter for transformers' LOAD REPORT of a reward model built from a causal LM:
    its score head is new (MISSING) and the LM head unused (UNEXPECTED), as stage=rm means; the
    table alarmed users on every rm run. A report naming any other key still shows."""

    def filter(self, record) -> bool:
        import re

        message = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())
        if "LOAD REPORT" not in message:
            return True
        keys = [line.split("|")[0].strip() for line in message.splitlines()
                if "|" in line and not line.startswith(("Key", "-"))]
        return not keys or not all(k.startswith(("score.", "lm_head.")) for k in keys)


def build_model(cfg: ModelConfig, tokenizer, quantization_config=None, head: str = "causal_lm"):
    """The model of the run: loaded from ``cfg.pretrained`` or initialised from its config.

    ``head="causal_lm"`` gives the language model; ``head="score"`` a one-label sequence classifier
    (a reward model) on the same backbone: from a causal-LM checkpoint its score head starts new.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto, extra, what = ((AutoModelForCausalLM, {}, "a causal LM") if head == "causal_lm"
                         else (AutoModelForSequenceClassification, {"num_labels": 1}, "a sequence-scoring model"))
    common = {"dtype": torch_dtype(cfg.dtype), "attn_implementation": cfg.attn_implementation}
    if head == "causal_lm" and cfg.pretrained is not None:
        check_not_a_reward_model(cfg.pretrained, "model.pretrained")
    if cfg.pretrained is None:
        model = auto.from_config(architecture_config(cfg, tokenizer, **extra), **common)
    else:
        import logging

        report = logging.getLogger("transformers.modeling_utils")
        quiet = _NewScoreHeadReport() if head == "score" else None
        if quiet:
            report.addFilter(quiet)
        try:
            model = load_pretrained(auto, cfg.pretrained, "model.pretrained", what,
                                    trust_remote_code=cfg.trust_remote_code,
                                    quantization_config=quantization_config, **extra, **common)
        finally:
            if quiet:
                report.removeFilter(quiet)
        check_tokenizer_fits(model, tokenizer, cfg)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode; a trained model's dropout must be on
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = stop_tokens(model.generation_config.eos_token_id, tokenizer.eos_token_id)
    if cfg.liger_kernel:
        apply_liger(model)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def stop_tokens(own, eos: Optional[int]):
    """The tokens generation stops at: the tokenizer's eos (the turn end a run may have adopted)
    first, then the others a pretrained model's generation config names (Llama 3.1's <|eom_id|>
    after a tool call, Gemma's <end_of_turn> beside <eos>): one id where that is all."""
    own = [own] if isinstance(own, int) else list(own or [])
    ids = list(dict.fromkeys([*([eos] if eos is not None else []), *own]))
    return ids[0] if len(ids) == 1 else ids or None


def apply_liger(model) -> None:
    """Swap RMSNorm, RoPE and SwiGLU for Liger's fused kernels (llmexp computes the loss itself,
    so the fused linear cross-entropy stays off)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise UserError("model.liger_kernel=true needs liger-kernel: pip install 'llmexp[liger]'") from None
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)


def check_tokenizer_fits(model, tokenizer, cfg: ModelConfig) -> None:
    """A tokenizer with ids beyond the embedding table would index out of range mid-run."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return
    # the class says where a token more comes from (transformers' Qwen2 class adds one to tokenizer.json's)
    loaded = f"{len(tokenizer)} tokens as {type(tokenizer).__name__}, the class a {model.config.model_type} model loads"
    if cfg.tokenizer is None:
        raise UserError(f"model.pretrained: the tokenizer in {cfg.pretrained!r} has {loaded}, but its model embeds only "
                        f"{rows}; the directory's tokenizer does not belong to its model: give "
                        f"model.tokenizer=<the tokenizer it was trained with> (at most {rows} tokens as that class "
                        f"loads it)")
    raise UserError(f"model.tokenizer: the tokenizer has {loaded}, but the model {cfg.pretrained!r} embeds only "
                    f"{rows}; give one of at most {rows} tokens as that class loads it (the model's own, with "
                    f"model.tokenizer=null, where it has one that fits)")


def packed_weights(model) -> int:
    """Weights held packed in integer buffers (GPTQ-style ``qweight``, as auto-round's layers load),
    not as parameters: ``infeatures`` x ``outfeatures`` per such layer."""
    return sum(m.infeatures * m.outfeatures for m in model.modules()
               if hasattr(m, "qweight") and hasattr(m, "infeatures") and hasattr(m, "outfeatures"))


def count_parameters(model) -> Dict[str, int]:
    """The model's weights (packed ones counted as the weights they stand for), and those that train."""
    total = sum(p.numel() for p in model.parameters()) + packed_weights(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}
