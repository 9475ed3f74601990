"""The answer_match eval: greedy answers to a registered dataset's prompts, scored against its answers.

Imported only when the eval runs (it needs torch through the model).
"""

from __future__ import annotations

import json
from typing import Dict, List

from llmexp.plugins import EvalContext
from llmexp.plugins.registry import lookup

from llmexp_answer_match.scoring import closeness, extract_number, is_match


def prompt_rows(dataset: str, num_samples: int, seed: int) -> List[dict]:
    """``num_samples`` rows with ``prompt`` (chat messages) and ``answer`` from a registered dataset."""
    decl = lookup("llmexp_datasets", dataset, "eval.answer_match.dataset").declaration
    if decl.columns is not None and not {"prompt", "answer"} <= set(decl.columns):
        from llmexp.errors import UserError

        raise UserError(f"eval.answer_match.dataset: {dataset!r} has columns {list(decl.columns)}, "
                        "needs prompt and answer (e.g. arithmetic_prompts)")
    fields = {f for f in getattr(decl.options, "__dataclass_fields__", {})}
    options = decl.options(**({"num_samples": num_samples} if "num_samples" in fields else {})) \
        if decl.options else None
    rows = []
    for row in decl.builder(options, seed):
        rows.append(row)
        if len(rows) == num_samples:
            break
    return rows


def run(ctx: EvalContext) -> Dict[str, float]:
    import torch

    o, model, tok = ctx.options, ctx.model, ctx.tokenizer
    rows = prompt_rows(o.dataset, o.num_samples, o.seed)
    device = next(model.parameters()).device
    details = []
    with torch.no_grad():
        for row in rows:
            text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            ids = tok(text, return_tensors="pt", add_special_tokens=False).to(device)
            out = model.generate(**ids, max_new_tokens=o.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            completion = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            details.append({"prompt": row["prompt"][-1]["content"], "completion": completion,
                            "answer": str(row["answer"]), "predicted": extract_number(completion),
                            "match": is_match(completion, row["answer"]),
                            "closeness": closeness(completion, row["answer"])})
    if ctx.run_dir is not None:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        with open(ctx.run_dir / "answer_match.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(d) + "\n" for d in details)
    n = len(details)
    return {"accuracy": sum(d["match"] for d in details) / n,
            "closeness": sum(d["closeness"] for d in details) / n,
            "answered": sum(d["predicted"] is not None for d in details) / n,
            "samples": n}
