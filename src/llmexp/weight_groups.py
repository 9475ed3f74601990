"""How int4 and autoround split each quantized layer's input into groups of weights sharing one
scale: the group size must divide every layer's input. Pure functions of the model's config, for
the stage and for preflight (which must not import the stage: that imports Lightning, 5 s)."""

from __future__ import annotations

from typing import List, Optional, Tuple

GROUP_SIZES = (128, 64, 32)  # stage.group_size=null takes the first that fits


def layer_input_sizes(config) -> List[int]:
    """The input sizes of a decoder's quantized linear layers (and the output projection's): the
    hidden size, the MLP's and the attention heads' concatenated width."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return sorted({config.hidden_size, config.intermediate_size, heads * head_dim})


def group_size_for(requested: Optional[int], input_sizes: List[int]) -> Optional[int]:
    """``requested`` if it divides every input size (None if not); with none requested, the
    largest of GROUP_SIZES that does (None if none does)."""
    for size in [requested] if requested else GROUP_SIZES:
        if all(n % size == 0 for n in input_sizes):
            return size
    return None


def group_size_problem(requested: Optional[int], input_sizes: List[int]) -> Optional[Tuple[str, str]]:
    """What is wrong with ``requested`` for layers of ``input_sizes``, and the fix; None if a
    size fits."""
    if group_size_for(requested, input_sizes) is not None:
        return None
    listed, fits = ", ".join(map(str, input_sizes)), group_size_for(None, input_sizes)
    if requested and fits:
        return (f"{requested} does not divide the input sizes of this model's layers ({listed})",
                f"stage.group_size={fits}, or null for the largest that fits")
    return (f"no group size of {', '.join(map(str, GROUP_SIZES))} divides the input sizes of this model's "
            f"layers ({listed})", "stage.method=int8 (one scale per output row) or stage.method=q4_0 (llama.cpp's "
            "blocks of 32)")
