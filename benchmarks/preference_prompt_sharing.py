"""Preference steps with each pair's prompt run once (stage.share_prompt=true; off by default)
against the whole rows (false, the default): milliseconds per forward + backward of a micro-batch's loss, for
rm, dpo (policy and reference), simpo and orpo, measured in the same process, interleaved.

Two workloads: the bundled pairs on the shipped tiny model (prompts of ~15 tokens, answers of
2-9: per-call overhead dominates), and long prompts on a larger llama (hidden 512, 4 layers;
8 pairs of 256-token prompts with 32-64-token answers), where the prompt is most of the compute.

    python benchmarks/preference_prompt_sharing.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List

from common import save

STAGES = ["rm", "dpo", "simpo", "orpo"]
LARGER = ["model.hidden_size=512", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=8",
          "model.intermediate_size=1376"]


def build(name: str, model: List[str]):
    import torch

    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.stages import stage_class
    from llmexp.testing import typed

    torch.manual_seed(0)
    stage = stage_class(name).create(typed([f"stage={name}", *model]), load_tokenizer(None, None))
    for p in stage.model.parameters():  # the reward model's score head starts at zero
        if p.dim() > 1 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    return stage.train()


def bundled_batch(stage) -> Dict[str, Any]:
    from llmexp.data.module import load_examples

    rows = list(load_examples(stage.cfg.data, stage.cfg.stage.name).train)[: stage.cfg.trainer.micro_batch_size]
    encode = stage.encoder("preference")
    return stage.collate([encode(r) for r in rows])


def long_prompt_batch(pairs: int = 8, prompt: int = 256, answer: int = 64) -> Dict[str, Any]:
    """Chosen rows then rejected rows, as collate_preference lays them out (random tokens)."""
    import torch

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(pairs):
        p = torch.randint(5, 500, (prompt,), generator=g).tolist()
        rows.append([(p, torch.randint(5, 500, (int(torch.randint(answer // 2, answer, (1,), generator=g)),),
                                       generator=g).tolist()) for _ in range(2)])
    ordered = [pair[0] for pair in rows] + [pair[1] for pair in rows]
    width = max(len(p) + len(a) for p, a in ordered)
    ids = torch.zeros(len(ordered), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for k, (p, a) in enumerate(ordered):
        ids[k, : len(p) + len(a)] = torch.tensor(p + a)
        mask[k, : len(p) + len(a)] = 1
        labels[k, len(p) : len(p) + len(a)] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "loss_weight": pairs}


def step_ms(stage, batch, share: bool, repeats: int) -> float:
    stage.cfg.stage.share_prompt = share
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        stage.pair_sums(batch)["loss"].sum().backward()
        best = min(best, time.perf_counter() - started)
        stage.model.zero_grad(set_to_none=True)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for workload, model, make in (("bundled pairs, shipped tiny model", [], bundled_batch),
                                  ("256-token prompts, hidden 512 x 4 layers", LARGER, lambda s: long_prompt_batch())):
        for name in STAGES:
            stage = build(name, model)
            batch = make(stage)
            step_ms(stage, batch, True, 1)  # warm-up
            step_ms(stage, batch, False, 1)
            shared = min(step_ms(stage, batch, True, args.repeats) for _ in range(2))
            whole = min(step_ms(stage, batch, False, args.repeats) for _ in range(2))
            rows.append({"workload": workload, "stage": name, "rows": int(batch["input_ids"].shape[0]),
                         "shared_ms": round(shared, 1), "whole_ms": round(whole, 1),
                         "speedup": round(whole / shared, 2)})
            print(f"{workload:42} {name:6} whole {whole:8.1f} ms  shared {shared:8.1f} ms  {whole / shared:5.2f}x")
    save("preference_prompt_sharing", {"rows": rows})


if __name__ == "__main__":
    main()
