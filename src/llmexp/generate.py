"""Generate from a run: load its exported model and answer prompts with the chat template applied.

    python -m llmexp.generate runs/sft-llama/<time> "What is 3 plus 4?" "Add 2 and 5."
    python -m llmexp.generate path/to/model "Tell me a story" --max-new-tokens 64 --temperature 0.8
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from llmexp.argtypes import non_empty_text, non_negative_float, positive_int
from llmexp.errors import UserError, reader_may_stop_early, report


def generate(model, tokenizer, prompts: List[str], max_new_tokens: int = 32, temperature: float = 0.0) -> List[str]:
    import torch

    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    context = getattr(model.config, "max_position_embeddings", None)
    for prompt, length in zip(prompts, batch["attention_mask"].sum(1).tolist()):
        if context and length + max_new_tokens > context:
            raise UserError(f"prompt {prompt[:40]!r}... is {length} tokens; with --max-new-tokens {max_new_tokens} "
                            f"it exceeds the model's context of {context} tokens; shorten it or lower "
                            f"--max-new-tokens")
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return [tokenizer.decode(o[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]


@reader_may_stop_early
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmexp.generate", description=__doc__.splitlines()[0])
    ap.add_argument("target", help="a run directory (its model/) or a model directory")
    ap.add_argument("prompts", nargs="+", type=non_empty_text)
    ap.add_argument("--max-new-tokens", type=positive_int, default=32)
    ap.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy")
    args = ap.parse_args(argv)
    from llmexp.env import configure_environment

    configure_environment(offline=True)
    try:
        from llmexp.record import load_language_model, model_dir_of

        model, tokenizer = load_language_model(model_dir_of(args.target))
        completions = generate(model, tokenizer, args.prompts, args.max_new_tokens, args.temperature)
    except UserError as e:
        return report(e)
    for prompt, completion in zip(args.prompts, completions):
        print(f"> {prompt}\n{completion}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
