"""GRPO throughput (sampled responses per second, rollout + update) of llmexp against TRL's GRPOTrainer.

Same tiny llama (same config and seed), same bundled arithmetic prompts and rule-based reward,
same batch (prompts x responses per prompt), the same response length cap, temperature 1, no KL
term (beta 0, so neither side keeps a reference), one update per rollout batch, fp32, on the same
CPU. Each side is timed over its training loop only.

    python benchmarks/grpo_throughput.py [--steps 30]
"""

from __future__ import annotations

import argparse

from common import lightning_clock, llmexp_run, save, trl_clock

MODEL = ["model=llama", "model.hidden_size=128", "model.num_layers=4", "model.num_heads=4",
         "model.num_kv_heads=2", "model.intermediate_size=512"]


def trl_run(steps: int, prompts: int, group: int, max_new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from llmexp.testing import compose
    from llmexp.preflight import preflight
    from llmexp.data.module import load_examples
    from llmexp.data.skill import correctness_reward
    from llmexp.models.build import architecture_config
    from llmexp.models.tokenizer import load_tokenizer

    cfg = preflight(compose([*MODEL, "stage=grpo"]))
    tok = load_tokenizer(None, None)
    torch.manual_seed(cfg.trainer.seed)
    model = AutoModelForCausalLM.from_config(architecture_config(cfg.model, tok), attn_implementation="sdpa")
    train = load_examples(cfg.data, "grpo").train

    def reward(completions, answer, **_):
        return [correctness_reward(c[-1]["content"] if isinstance(c, list) else c, a)
                for c, a in zip(completions, answer)]

    clock = trl_clock()
    args = GRPOConfig(output_dir="/tmp/trl-grpo-bench", max_steps=steps, per_device_train_batch_size=prompts * group,
                      num_generations=group, max_completion_length=max_new, temperature=1.0, top_k=0, beta=0.0,
                      num_iterations=1, learning_rate=1e-3, use_cpu=True, report_to="none", logging_steps=steps,
                      save_strategy="no", bf16=False, gradient_checkpointing=False, seed=cfg.trainer.seed,
                      dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=train, processing_class=tok,
                          callbacks=[clock])
    trainer.train()
    return {"responses": steps * prompts * group, "seconds": clock.seconds,
            "responses_per_second": steps * prompts * group / clock.seconds}


def llmexp_side(steps: int, prompts: int, group: int, max_new: int) -> dict:
    clock = lightning_clock()
    llmexp_run([*MODEL, "stage=grpo", f"trainer.max_steps={steps}", f"trainer.micro_batch_size={prompts}",
                f"stage.group_size={group}", f"stage.rollout.max_new_tokens={max_new}", "optim.lr=1e-3",
                "optim.warmup_steps=1", "trainer.val_check_interval=null", "trainer.limit_val_batches=1"],
               callbacks=[clock])
    return {"responses": steps * prompts * group, "seconds": clock.seconds,
            "responses_per_second": steps * prompts * group / clock.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    settings = (args.steps, args.prompts, args.group, args.max_new_tokens)
    ours = max((llmexp_side(*settings) for _ in range(args.repeats)), key=lambda r: r["responses_per_second"])
    theirs = max((trl_run(*settings) for _ in range(args.repeats)), key=lambda r: r["responses_per_second"])
    ratio = ours["responses_per_second"] / theirs["responses_per_second"]
    print(f"grpo  llmexp {ours['responses_per_second']:7.1f} responses/s   TRL {theirs['responses_per_second']:7.1f} "
          f"responses/s   ratio {ratio:.2f}x")
    save("grpo_throughput", {"settings": vars(args), "model": MODEL,
                             "results": {"llmexp": ours, "trl": theirs, "ratio": ratio}})


if __name__ == "__main__":
    main()
