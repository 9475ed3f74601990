"""PPO throughput (sampled responses per second, rollout + updates) of llmexp against a plain loop
of the same algorithm.

TRL 1.16 no longer ships a PPO trainer (neither in trl nor trl.experimental), so the baseline is
a plain PyTorch loop of exactly llmexp's PPO: ``model.generate`` samples, one forward pass gives
the old log-probs and values (a value head on the policy's last hidden state), one more the frozen
reference's log-probs, then KL-penalised rewards, GAE, whitened advantages and ``ppo_epochs``
clipped updates, with the same pure functions for the math (llmexp.advantages, llmexp.losses), the
same fused AdamW, model, weights, prompts, reward and batch. The loop is the speed difference.

    python benchmarks/ppo_throughput.py [--steps 10] [--init sft random]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Dict, List, Optional

from common import lightning_clock, llmexp_run, save, sft_policy

MODEL = ["model=llama", "model.hidden_size=128", "model.num_layers=4", "model.num_heads=4",
         "model.num_kv_heads=2", "model.intermediate_size=512"]
ABLATIONS = {
    "llmexp without dropping finished rows": ["stage.rollout.drop_finished=false"],
    "llmexp with model.generate (no speed-up)": ["stage.rollout.engine=generate"],
}


def plain_loop(steps: int, prompts: int, accum: int, max_new: int, epochs: int, policy: Optional[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from llmexp import advantages as M
    from llmexp.data.collate import collate_prompts
    from llmexp.data.encode import prompt_encoder
    from llmexp.data.module import load_examples
    from llmexp.data.skill import correctness_reward
    from llmexp.losses import clipped_policy_loss, clipped_value_loss
    from llmexp.models.build import architecture_config
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.preflight import preflight
    from llmexp.testing import compose

    cfg = preflight(compose([*MODEL, "stage=ppo"]))
    s = cfg.stage
    tok = load_tokenizer(None, None)
    torch.manual_seed(cfg.trainer.seed)
    model = (AutoModelForCausalLM.from_pretrained(policy, attn_implementation="sdpa") if policy else
             AutoModelForCausalLM.from_config(architecture_config(cfg.model, tok), attn_implementation="sdpa"))
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    value_head = torch.nn.Linear(model.config.hidden_size, 1)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    params = list(model.parameters()) + list(value_head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
    encode = prompt_encoder(tok)
    rows = [encode(r) for r in load_examples(cfg.data, "ppo").train]

    def forward(m, seq, attn, pos, P, values=False):
        out = m(input_ids=seq, attention_mask=attn, position_ids=pos, output_hidden_states=values)
        logits = out.logits[:, P - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, seq[:, P:].unsqueeze(-1)).squeeze(-1)
        v = value_head(out.hidden_states[-1][:, P - 1:-1]).squeeze(-1) if values else None
        return logp, v

    start = time.perf_counter()
    for step in range(steps):
        batch = []
        for a in range(accum):
            first = (step * accum + a) * prompts  # in order, wrapping around as llmexp's loader does
            chunk = [rows[i % len(rows)] for i in range(first, first + prompts)]
            b = collate_prompts(chunk, tok.pad_token_id)
            ids, pmask = b["prompt_ids"], b["prompt_mask"]
            model.eval()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=pmask, max_new_tokens=max_new, min_new_tokens=1,
                                     do_sample=True, temperature=1.0, top_k=0, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
            model.train()
            resp = out[:, ids.shape[1]:]
            mask = M.response_mask(resp, tok.eos_token_id)
            attn = torch.cat([pmask, mask.long()], 1)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            seq, P = torch.cat([ids, resp], 1), ids.shape[1]
            texts = [tok.decode(r[: int(m.sum())], skip_special_tokens=True).strip() for r, m in zip(resp.tolist(), mask)]
            scores = torch.tensor([correctness_reward(t, c["answer"]) for t, c in zip(texts, b["columns"])])
            with torch.no_grad():
                old, values = forward(model, seq, attn, pos, P, values=True)
                ref, _ = forward(reference, seq, attn, pos, P)
            reward, _ = M.kl_penalised_rewards(scores, old, ref, mask, s.kl_coef)
            adv, ret = M.gae(reward, values, mask, s.gamma, s.lam)
            batch.append(dict(seq=seq, attn=attn, pos=pos, P=P, mask=mask, old=old, values=values, adv=adv, ret=ret))
        for r, adv in zip(batch, M.masked_whiten_across([r["adv"] for r in batch], [r["mask"] for r in batch])):
            r["adv"] = adv
        for _ in range(epochs):
            tokens = float(sum(r["mask"].sum() for r in batch))
            for r in batch:
                logp, v = forward(model, r["seq"], r["attn"], r["pos"], r["P"], values=True)
                pg, _, _ = clipped_policy_loss(logp, r["old"], r["adv"], s.clip_range)
                vf, _ = clipped_value_loss(v, r["values"], r["ret"], s.clip_range_value)
                loss = M.masked_sum(pg, r["mask"]) + s.value_loss_coef * M.masked_sum(vf, r["mask"])
                (loss / tokens).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    n = steps * accum * prompts
    return {"responses": n, "seconds": seconds, "responses_per_second": n / seconds}


def llmexp_side(steps: int, prompts: int, accum: int, max_new: int, epochs: int, policy: Optional[str],
                extra: List[str] = ()) -> dict:
    clock = lightning_clock()
    start = [f"model.pretrained={policy}"] if policy else []
    summary = llmexp_run([*MODEL, *start, "stage=ppo", f"trainer.max_steps={steps}",
                          f"trainer.micro_batch_size={prompts}", f"trainer.grad_accum={accum}",
                          f"stage.ppo_epochs={epochs}", "stage.num_minibatches=1", "stage.rollout.temperature=1.0",
                          f"stage.rollout.max_new_tokens={max_new}", "optim.lr=1e-5", "optim.warmup_steps=1",
                          "trainer.val_check_interval=null", "trainer.limit_val_batches=1", *extra],
                         callbacks=[clock])
    n = steps * accum * prompts
    return {"responses": n, "seconds": clock.seconds, "responses_per_second": n / clock.seconds,
            "time_split": summary["time_split"]}


def measure(init: str, args) -> Dict[str, dict]:
    policy = sft_policy(MODEL) if init == "sft" else None
    settings = (args.steps, args.prompts, args.grad_accum, args.max_new_tokens, args.ppo_epochs, policy)
    rows: Dict[str, List[dict]] = {"llmexp": [], "plain loop": [], **{k: [] for k in ABLATIONS}}
    for _ in range(args.repeats):  # interleaved, so load on the machine hits every side alike
        rows["llmexp"].append(llmexp_side(*settings))
        rows["plain loop"].append(plain_loop(*settings))
        if args.ablations:
            for name, extra in ABLATIONS.items():
                rows[name].append(llmexp_side(*settings, extra=extra))
    out = {name: max(runs, key=lambda r: r["responses_per_second"]) for name, runs in rows.items() if runs}
    base = out["plain loop"]["responses_per_second"]
    for r in out.values():
        r["ratio_to_plain_loop"] = r["responses_per_second"] / base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--init", nargs="+", default=["sft", "random"], choices=["sft", "random"])
    ap.add_argument("--no-ablations", dest="ablations", action="store_false")
    args = ap.parse_args()
    results = {init: measure(init, args) for init in args.init}
    print(f"\n{'start':7} {'side':42} {'responses/s':>12} {'vs loop':>8}  split (s): rollout / old log-probs / "
          f"reference / optimisation")
    for init, rows in results.items():
        for name, r in rows.items():
            split = r.get("time_split", {})
            parts = " / ".join(f"{split.get(k + '_seconds', 0):.1f}"
                               for k in ("rollout", "old_logprobs", "reference", "optimisation"))
            print(f"{init:7} {name:42} {r['responses_per_second']:12.1f} {r['ratio_to_plain_loop']:7.2f}x  "
                  f"{parts if split else ''}")
    save("ppo_throughput", {"settings": vars(args), "model": MODEL, "results": results})


if __name__ == "__main__":
    main()
