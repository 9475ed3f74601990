"""GRPO throughput (sampled responses per second, rollout + update) of llmexp against TRL's GRPOTrainer.

Same tiny llama (same config and weights), same bundled arithmetic prompts and rule-based reward,
same batch (prompts x responses per prompt), the same response length cap, temperature 1, no KL
term (beta 0, so neither side keeps a reference), one update per rollout batch, fp32, on the same
CPU. Each side is timed over its training loop only.

Two starting points: ``sft`` (the job as users run it: a policy that already answers, so
responses end at different lengths; a 150-step llmexp SFT of the same model) and ``random``
(a fresh init: every response runs to the length cap). Then llmexp again with each rollout
speed-up switched off in turn, so each one's share is measured in the same run.

    python benchmarks/grpo_throughput.py [--steps 30] [--init sft random]
"""

from __future__ import annotations

import tempfile
from typing import Dict, List, Optional

from common import (MULTINOMIAL, best_of_interleaved, lightning_clock, llmexp_run, print_rollout_table,
                    rollout_arguments, save, sft_policy, trl_clock, with_multinomial_draw)

MODEL = ["model=llama", "model.hidden_size=128", "model.num_layers=4", "model.num_heads=4",
         "model.num_kv_heads=2", "model.intermediate_size=512"]
# Each row switches one speed-up off (measured against the full engine).
ABLATIONS = {
    "llmexp running the groups that scored alike": ["stage.skip_groups_without_signal=false"],
    "llmexp without shared prefill": ["stage.rollout.share_prefill=false"],
    "llmexp without dropping finished rows": ["stage.rollout.drop_finished=false"],
    "llmexp with model.generate, nothing shared (no speed-up)": ["stage.rollout.engine=generate",
                                                                 "stage.rollout.share_prefill=false"],
}


def trl_run(steps: int, prompts: int, group: int, max_new: int, policy: Optional[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from llmexp.data.module import load_examples
    from llmexp.data.skill import correctness_reward
    from llmexp.models.build import architecture_config
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.preflight import preflight
    from llmexp.testing import compose

    cfg = preflight(compose([*MODEL, "stage=grpo"]))
    tok = load_tokenizer(None, None)
    torch.manual_seed(cfg.trainer.seed)
    if policy:
        model = AutoModelForCausalLM.from_pretrained(policy, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_config(architecture_config(cfg.model, tok), attn_implementation="sdpa")
    train = load_examples(cfg.data, "grpo").train

    def reward(completions, answer, **_):
        return [correctness_reward(c[-1]["content"] if isinstance(c, list) else c, a)
                for c, a in zip(completions, answer)]

    clock = trl_clock()
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-grpo-bench-"), max_steps=steps,
                      per_device_train_batch_size=prompts * group, num_generations=group,
                      max_completion_length=max_new, temperature=1.0, top_k=0, beta=0.0, num_iterations=1,
                      learning_rate=1e-4, use_cpu=True, report_to="none", logging_steps=steps, save_strategy="no",
                      bf16=False, gradient_checkpointing=False, seed=cfg.trainer.seed, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=train, processing_class=tok,
                          callbacks=[clock])
    trainer.train()
    return {"responses": steps * prompts * group, "seconds": clock.seconds,
            "responses_per_second": steps * prompts * group / clock.seconds}


def llmexp_side(steps: int, prompts: int, group: int, max_new: int, policy: Optional[str],
                extra: List[str] = ()) -> dict:
    clock = lightning_clock()
    start = [f"model.pretrained={policy}"] if policy else []
    summary = llmexp_run([*MODEL, *start, "stage=grpo", f"trainer.max_steps={steps}",
                          f"trainer.micro_batch_size={prompts}", "trainer.grad_accum=1", "stage.epochs=1",
                          f"stage.group_size={group}", f"stage.rollout.max_new_tokens={max_new}",
                          "stage.rollout.temperature=1.0", "optim.lr=1e-4", "optim.warmup_steps=1",
                          "trainer.val_check_interval=null", "trainer.limit_val_batches=1", *extra],
                         callbacks=[clock])
    return {"responses": steps * prompts * group, "seconds": clock.seconds,
            "responses_per_second": steps * prompts * group / clock.seconds, "time_split": summary["time_split"]}


def measure(init: str, args) -> Dict[str, dict]:
    policy = sft_policy(MODEL) if init == "sft" else None
    settings = (args.steps, args.prompts, args.group, args.max_new_tokens, policy)
    sides = {"llmexp": lambda: llmexp_side(*settings), "TRL GRPOTrainer": lambda: trl_run(*settings)}
    if args.ablations:
        sides.update({name: (lambda extra=extra: llmexp_side(*settings, extra=extra))
                      for name, extra in ABLATIONS.items()})
        sides[MULTINOMIAL] = with_multinomial_draw(lambda: llmexp_side(*settings))
    return best_of_interleaved(sides, args.repeats, "TRL GRPOTrainer", "ratio_to_trl")


def main() -> None:
    args = rollout_arguments(__doc__, steps=30, prompts=16, group=4, max_new_tokens=16).parse_args()
    results = {init: measure(init, args) for init in args.init}
    print_rollout_table(results, "ratio_to_trl", "vs TRL", ["rollout", "scoring", "optimisation"])
    save("grpo_throughput", {"settings": vars(args), "model": MODEL, "results": results})


if __name__ == "__main__":
    main()
