"""`llmexp export <run dir> --format gguf`: a run's model as one GGUF file for llama.cpp, written
with the `gguf` package (llama.cpp's own writer): the architecture's hyperparameters, the BPE
tokenizer with its merges and special tokens, the chat template, and the weights under GGUF's
tensor names, laid out as llama.cpp's convert_hf_to_gguf lays them out: llama and mistral with
q/k rows permuted to its rotary layout, qwen2 with its biases, gpt2 with Conv1D weights transposed.
The command is llmexp.export_command's.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

# HF architecture -> (GGUF architecture, whether q/k rows go to llama.cpp's interleaved rotary
# layout): llama and mistral are GGUF's llama (permuted, as convert_hf_to_gguf's LlamaModel does);
# qwen2 is its own, with q/k/v biases and HF's rotary halves kept (its Qwen2Model does not permute).
# gpt2 is GGUF's gpt2: its Conv1D weights (in, out) are transposed to (out, in) and its causal-mask
# buffers dropped, as convert_hf_to_gguf's GPT2Model does.
ARCHITECTURES = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
                 "Qwen2ForCausalLM": ("qwen2", False), "GPT2LMHeadModel": ("gpt2", False)}
CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
# --type: how the 2-D weights are stored (llama.cpp's names; its converter's --outtype, and llama-quantize's
# q4_0). 1-D tensors, biases and gpt2's position table stay f32, and a weight whose rows do not split into
# the type's blocks (32 values) falls back to f16, as llama.cpp's converter does.
TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")



def run_config(model_dir: Path) -> dict:
    """The config.yaml of the run whose model ``model_dir`` is (its model/ or an export), or {}."""
    import yaml

    from llmexp.record import run_of_model

    run = run_of_model(model_dir)
    config = run.config if run is not None else None
    try:
        loaded = yaml.safe_load(config.read_text()) if config is not None and config.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def portable_template(template: str) -> str:
    """The chat template without transformers' ``{% generation %}`` markers (they only mark the
    assistant's tokens for its loss mask): plain Jinja2, as llama-cpp-python and other GGUF readers
    render it, stopped at the unknown tag."""
    import re

    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)


def permute_rotary(weight, n_head: int):
    """HF's q/k projection rows (rotary halves) to llama.cpp's interleaved pairs."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _is_gpt2_byte_level(step) -> bool:
    return (step or {}).get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")


def _is_qwen2_split(step) -> bool:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return ((step or {}).get("type") == "Split" and step.get("pattern") == {"Regex": PRETOKENIZE_REGEX}
            and step.get("behavior") == "Isolated" and not step.get("invert"))


def llama_cpp_pre_tokenizer(pre) -> str:
    """llama.cpp's name for the way a tokenizer.json's pre-tokenizer splits text before BPE, so that
    llama.cpp tokenizes text as transformers does: GPT-2's byte-level split is its ``gpt2``; digits
    split one by one first, then GPT-2's split (llmexp's tokenizer) its ``starcoder`` (``\\p{N}``,
    then GPT-2's expression); Qwen2's expression, then bytes (what transformers' Qwen2 tokenizer
    makes of any vocabulary, llmexp's in a model=qwen2 run) its ``qwen2``. Other splits are
    refused: llama.cpp's ``default`` would split them otherwise (e.g. '0 +' into '0', ' ', '+'
    where the tokenizer has '0', ' +')."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _is_gpt2_byte_level(steps[0]):
        return "gpt2"
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and _is_gpt2_byte_level(steps[1])):
        return "starcoder"
    if (len(steps) == 2 and _is_qwen2_split(steps[0]) and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return "qwen2"
    raise ValueError(f"a tokenizer whose pre-tokenizer ({json.dumps(pre)[:200]}) GGUF export does not map to "
                     "llama.cpp's (it writes GPT-2's byte-level split, with or without digits split one by one, "
                     "and Qwen2's); convert a hub model with llama.cpp's convert_hf_to_gguf.py")


def _tokenizer_fields(writer, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    import gguf

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    # and the added tokens marked special that are no named special token (ChatML's <|im_start|>):
    # written NORMAL, llama.cpp split them as text in every prompt the chat template renders
    special = set(tok.all_special_tokens) | {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(llama_cpp_pre_tokenizer(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    if tok.bos_token_id is not None:
        writer.add_bos_token_id(tok.bos_token_id)
    writer.add_add_bos_token(False)
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(portable_template(tok.chat_template))


EMBEDDINGS = ("token_embd.weight", "output.weight")


def _stored(name: str, array, tensor_type: str, embeddings: bool = True):
    """(the data to write, its GGML type) of one tensor for ``--type tensor_type``; with
    ``embeddings`` false the input embedding and the output projection stay f32."""
    import numpy as np

    import gguf

    Q = gguf.GGMLQuantizationType
    if (tensor_type == "f32" or array.ndim < 2 or not name.endswith(".weight") or name.startswith("position_embd")
            or (not embeddings and name in EMBEDDINGS)):
        return array, Q.F32
    qtype = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[tensor_type]
    if qtype == Q.F16 or array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return array.astype(np.float16), Q.F16
    return gguf.quants.quantize(array, qtype), qtype


def gguf_architecture(model_dir: Path) -> Optional[tuple]:
    """(GGUF architecture, whether q/k rows are permuted) of an exported model, None if GGUF export
    does not write its architecture."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return next((ARCHITECTURES[a] for a in config.get("architectures") or [] if a in ARCHITECTURES), None)


def check_writable(model_dir: Path) -> tuple:
    """(GGUF architecture, whether q/k rows are permuted) of ``model_dir``; ValueError naming what
    GGUF export cannot write: the architecture, quantized weights, or the tokenizer."""
    config = json.loads((model_dir / "config.json").read_text())
    found = gguf_architecture(model_dir)
    if found is None:
        raise ValueError(f"architecture {config.get('architectures')} (GGUF export writes llama, mistral, qwen2 "
                         "and gpt2 models: model=llama, mistral, qwen2 or gpt2)")
    if "quantization_config" in config:
        source = run_config(model_dir).get("model", {}).get("pretrained")
        raise ValueError("a quantized export (GGUF export reads full-precision weights: export the run "
                         f"quantize started from{f', {source}' if source else ''}, and quantize with llama.cpp's "
                         "llama-quantize)")
    if not (model_dir / "tokenizer.json").is_file():
        raise ValueError("a model without tokenizer.json (GGUF export writes byte-level BPE tokenizers)")
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"a {spec['model']['type']} tokenizer (GGUF export writes byte-level BPE tokenizers)")
    llama_cpp_pre_tokenizer(spec.get("pre_tokenizer"))
    return found


def write_gguf(model_dir: Path, out: Path, tensor_type: str = "f32", embeddings: bool = True,
               name: Optional[str] = None) -> dict:
    """Write ``model_dir`` (an exported HF llama, mistral, qwen2 or gpt2) as GGUF, its weights stored
    as ``tensor_type`` (TENSOR_TYPES; with ``embeddings`` false the embedding and output projection
    stay f32), called ``name`` (default: its run's); return its facts, ``weight_bytes`` the
    tensors' bytes (without the tokenizer)."""
    import gguf
    import torch
    from safetensors.torch import load_file

    arch, permute = check_writable(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    gguf_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gpt2": gguf.MODEL_ARCH.GPT2}[arch]
    writer = gguf.GGUFWriter(str(out), arch)
    # the run's name, as serve calls the model (the directory's was a timestamp: 20261207-113012-477141)
    writer.add_name(name or model_name(model_dir))
    if arch == "gpt2":
        n_head = n_kv = config["n_head"]
        n_layer = config["n_layer"]
        writer.add_context_length(config["n_positions"])
        writer.add_embedding_length(config["n_embd"])
        writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
        writer.add_layer_norm_eps(config["layer_norm_epsilon"])
        embed = "transformer.wte.weight"
    else:
        n_head = config["num_attention_heads"]
        n_kv = config.get("num_key_value_heads") or n_head
        n_layer = config["num_hidden_layers"]
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get(
            "rope_theta", 10000.0)))
        writer.add_rope_dimension_count(config["hidden_size"] // n_head)
        embed = "model.embed_tokens.weight"
    names = gguf.get_tensor_name_map(gguf_arch, n_layer)
    writer.add_block_count(n_layer)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[tensor_type])
    _tokenizer_fields(writer, model_dir)
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if "lm_head.weight" not in state and config.get("tie_word_embeddings", arch == "gpt2"):
        state["lm_head.weight"] = state[embed]
    shapes, types, nbytes = {}, {}, {}
    for key, tensor in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # gpt2's causal-mask buffers, not weights
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"tensor {key!r} has no GGUF name for a {arch} model")
        tensor = tensor.to(torch.float32)
        if permute and key.endswith("q_proj.weight"):
            tensor = permute_rotary(tensor, n_head)
        elif permute and key.endswith("k_proj.weight"):
            tensor = permute_rotary(tensor, n_kv)
        elif arch == "gpt2" and key.endswith(CONV1D):
            tensor = tensor.t()
        array = tensor.contiguous().numpy()
        data, qtype = _stored(name, array, tensor_type, embeddings)
        writer.add_tensor(name, data, raw_dtype=qtype)
        shapes[name], types[name], nbytes[name] = list(array.shape), qtype.name, data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"gguf": str(out), "architecture": arch, "tensors": len(shapes), "bytes": out.stat().st_size,
            "weight_bytes": sum(nbytes.values()), "type": tensor_type, "tensor_types": dict(sorted(Counter(types.values()).items()))}


def model_name(model_dir: Path) -> str:
    """What the model is called: its run's name (with a checkpoint export's step: sft-llama-step-400),
    else its directory's."""
    from llmexp.record import run_of_model

    run, name = run_of_model(model_dir), run_config(model_dir).get("run_name")
    if name and run is not None and run.model != Path(model_dir):
        return f"{name}-{Path(model_dir).name}"
    return str(name or model_dir.parent.name or model_dir.name)


def merged_copy(adapter_dir: Path, into: Path) -> Path:
    """LoRA adapters exported alone (peft.merge_on_export=false) merged onto their base and saved
    as a whole model in ``into`` (a GGUF file holds a whole model; generate and eval merge them so too)."""
    from llmexp.record import load_language_model

    model, tokenizer = load_language_model(adapter_dir)
    model.save_pretrained(str(into), safe_serialization=True)
    tokenizer.save_pretrained(str(into))
    return into


def output_file(given, model_dir: Path) -> Path:
    """The GGUF file to write: --out, or model.gguf in the directory it names (an existing one, or
    one ending in '/', made here), else <run dir>/model.gguf; an existing file or a missing
    parent directory is a UserError naming --out."""
    import os

    from llmexp.errors import UserError

    if not given:
        out = model_dir.parent / "model.gguf"
    elif given.endswith(("/", os.sep)) or Path(given).is_dir():
        Path(given).mkdir(parents=True, exist_ok=True)
        out = Path(given) / "model.gguf"
    else:
        out = Path(given)
        if not out.parent.is_dir():
            raise UserError(f"--out: directory {str(out.parent)!r} does not exist; create it, or give --out "
                            f"{str(out.parent)}/ to have it made")
    if out.exists():
        raise UserError(f"--out: {str(out)!r} exists and is kept{_own_gguf_note(out, model_dir)}; give another "
                        f"--out or remove it")
    return out


def _own_gguf_note(out: Path, model_dir: Path) -> str:
    """Where ``out`` is the GGUF file a stage=quantize run wrote (q8_0/q4_0), say so: it is the
    file for llama.cpp already, and an export of its model/ would store those rounded weights again
    in --type (f32 by default: 4-7x larger)."""
    import json

    try:
        q = json.loads((model_dir.parent / "summary.json").read_text()).get("quantization") or {}
    except (OSError, ValueError):
        return ""
    if not q.get("gguf") or out.resolve() != (model_dir.parent / Path(q["gguf"]).name).resolve():
        return ""  # (by name in the run directory: the run may have been moved since)
    return (f": it is this stage=quantize run's {q.get('method')} file, ready for llama.cpp as it is (an export "
            f"would write its {q.get('method')}-rounded weights again, as --type says)")
