"""PPO throughput of llmexp against TRL's PPOTrainer and against a plain loop of llmexp's own PPO.

Throughput is sampled responses per second over rollout and updates.

The job: the same llama from the same weights, the bundled arithmetic prompts, scored by the same
reward model (llmexp's stage=rm from the SFT policy, raw scores), 32 prompts x 2 micro-batches per
rollout, one response each, at most 16 new tokens, temperature 1, kl_coef 0.05, 4 PPO epochs of one
update each, lr 1e-5, fp32.

- **TRL**: ``trl.experimental.ppo.PPOTrainer``. TRL removed it after 1.12, so it runs from trl 1.12.0
  (the last release that ships it), installed with ``pip install --no-deps --target`` into
  benchmarks/.trl-1.12.0 on first use, in a process of its own (benchmarks/trl_ppo_side.py). Its
  critic is its own model (TRL's convention: started from the reward model), run beside the policy in
  the rollout and in every update.
- **plain loop**: exactly llmexp's PPO written as a PyTorch loop: ``model.generate`` samples, one
  forward pass gives the old log-probs and values (a value head on the policy's last hidden state),
  one more the frozen reference's log-probs, then KL-penalised rewards, GAE, whitened advantages and
  ``ppo_epochs`` clipped updates, with the same pure functions for the math (llmexp.advantages,
  llmexp.losses) and the same fused AdamW. The loop is the only difference: what llmexp's engine adds.

    python benchmarks/ppo_throughput.py [--steps 10] [--init sft random] [--no-ablations]
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from common import (MULTINOMIAL, best_of_interleaved, lightning_clock, llmexp_run, print_rollout_table,
                    rollout_arguments, save, sft_policy, with_multinomial_draw)

TRL_WITH_PPO = "1.12.0"  # the last trl release that ships a PPO trainer
TRL_DIR = Path(__file__).resolve().parent / f".trl-{TRL_WITH_PPO}"
TRL_WITHOUT_GC = "TRL PPOTrainer without its per-step gc.collect()"

# the KL weight its measurements were made with (ppo's default until 2026-12-06; now 0.1): the same work
KL = ["stage.kl_coef=0.05"]
MODEL = ["model=llama", "model.hidden_size=128", "model.num_layers=4", "model.num_heads=4",
         "model.num_kv_heads=2", "model.intermediate_size=512"]
ABLATIONS = {
    "llmexp without dropping finished rows": ["stage.rollout.drop_finished=false"],
    "llmexp with model.generate (no speed-up)": ["stage.rollout.engine=generate"],
}


def reward_model(policy: str) -> str:
    """The job's reward model: llmexp's stage=rm (100 steps) from ``policy`` on the bundled
    preference pairs, its exported model directory."""
    summary = llmexp_run([*MODEL, "stage=rm", f"model.pretrained={policy}", "trainer.max_steps=100",
                          "trainer.val_check_interval=null", "trainer.limit_val_batches=1"])
    return summary["model_dir"]


def trl_with_ppo() -> Path:
    """A directory holding trl 1.12.0 (installed there on first use, without dependencies: the
    project's transformers, accelerate and datasets serve it)."""
    if not (TRL_DIR / "trl" / "experimental" / "ppo").is_dir():
        print(f"installing trl=={TRL_WITH_PPO} (the last release with a PPO trainer) into {TRL_DIR}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TRL_DIR),
                        f"trl=={TRL_WITH_PPO}"], check=True)
    return TRL_DIR


def trl_side(steps: int, prompts: int, accum: int, max_new: int, epochs: int, policy: Optional[str],
             rm: str, without_gc: bool = False) -> dict:
    """TRL's PPOTrainer on the job, in its own process with trl 1.12.0 first on the path
    (``without_gc``: its two gc.collect() calls per step left out)."""
    settings = dict(model=MODEL, overrides=KL, steps=steps, prompts=prompts, grad_accum=accum, max_new_tokens=max_new,
                    epochs=epochs, policy=policy, reward_model=rm, without_gc=without_gc)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(trl_with_ppo()), str(here),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(here / "trl_ppo_side.py"), json.dumps(settings)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the TRL side failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plain_loop(steps: int, prompts: int, accum: int, max_new: int, epochs: int, policy: Optional[str],
               rm: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from llmexp import advantages as M
    from llmexp.data.collate import collate_prompts
    from llmexp.data.encode import prompt_encoder
    from llmexp.data.module import load_examples
    from llmexp.losses import clipped_policy_loss, clipped_value_loss
    from llmexp.models.build import architecture_config
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.preflight import preflight
    from llmexp.rewards import ModelReward
    from llmexp.testing import compose

    cfg = preflight(compose([*MODEL, "stage=ppo", *KL]))
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
    score_with = ModelReward(rm, normalize=False)

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
            texts = [tok.decode(r[: int(m.sum())], skip_special_tokens=True).strip()
                     for r, m in zip(resp.tolist(), mask)]
            scores = score_with(b["prompts"], texts, b["columns"])
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
                rm: str, extra: List[str] = ()) -> dict:
    clock = lightning_clock()
    start = [f"model.pretrained={policy}"] if policy else []
    summary = llmexp_run([*MODEL, *start, "stage=ppo", f"trainer.max_steps={steps}",
                          f"trainer.micro_batch_size={prompts}", f"trainer.grad_accum={accum}",
                          f"stage.ppo_epochs={epochs}", "stage.num_minibatches=1", "stage.rollout.temperature=1.0",
                          f"stage.reward.model={rm}", "stage.reward.normalize=false",
                          f"stage.rollout.max_new_tokens={max_new}", "optim.lr=1e-5", "optim.warmup_steps=1", *KL,
                          "trainer.val_check_interval=null", "trainer.limit_val_batches=1", *extra],
                         callbacks=[clock])
    n = steps * accum * prompts
    return {"responses": n, "seconds": clock.seconds, "responses_per_second": n / clock.seconds,
            "time_split": summary["time_split"]}


def measure(init: str, sft: str, rm: str, args) -> Dict[str, dict]:
    policy = sft if init == "sft" else None
    settings = (args.steps, args.prompts, args.grad_accum, args.max_new_tokens, args.ppo_epochs, policy, rm)
    sides = {"llmexp": lambda: llmexp_side(*settings), "TRL PPOTrainer": lambda: trl_side(*settings),
             "plain loop": lambda: plain_loop(*settings)}
    if args.ablations:
        sides.update({name: (lambda extra=extra: llmexp_side(*settings, extra=extra))
                      for name, extra in ABLATIONS.items()})
        sides[MULTINOMIAL] = with_multinomial_draw(lambda: llmexp_side(*settings))
        sides[TRL_WITHOUT_GC] = lambda: trl_side(*settings, without_gc=True)
    out = best_of_interleaved(sides, args.repeats, "TRL PPOTrainer", "ratio_to_trl")
    for r in out.values():
        r["ratio_to_plain_loop"] = r["responses_per_second"] / out["plain loop"]["responses_per_second"]
    return out


def main() -> None:
    args = rollout_arguments(__doc__, steps=10, prompts=32, grad_accum=2, ppo_epochs=4, max_new_tokens=16).parse_args()
    sft = sft_policy(MODEL)
    rm = reward_model(sft)
    results = {init: measure(init, sft, rm, args) for init in args.init}
    print_rollout_table(results, "ratio_to_trl", "vs TRL", ["rollout", "scoring", "reference", "optimisation"])
    save("ppo_throughput", {"settings": vars(args), "model": MODEL, "trl": TRL_WITH_PPO, "results": results})


if __name__ == "__main__":
    main()
