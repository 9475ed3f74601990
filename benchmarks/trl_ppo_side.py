"""The TRL side of benchmarks/ppo_throughput.py: TRL's own PPOTrainer (trl.experimental.ppo) on the
job llmexp runs, in a process of its own.

TRL removed its PPO trainer after 1.12, so ppo_throughput.py runs this file with trl 1.12.0 (the last
release that ships it) first on the path, installed apart from the project's own trl. One JSON line
on stdout carries the result.

    python benchmarks/trl_ppo_side.py '<json settings>'
"""

from __future__ import annotations

import json
import sys
import tempfile

from common import trl_clock


def main(settings: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    import trl
    from llmexp.data.encode import render_prompt
    from llmexp.data.module import load_examples
    from llmexp.models.build import architecture_config
    from llmexp.models.tokenizer import load_tokenizer
    from llmexp.preflight import preflight
    from llmexp.testing import compose

    cfg = preflight(compose([*settings["model"], "stage=ppo", *settings["overrides"]]))
    s = cfg.stage
    tok = load_tokenizer(None, None)
    tok.padding_side = "left"  # TRL generates from the collator's batch: prompts end where responses start
    torch.manual_seed(cfg.trainer.seed)
    policy = settings["policy"]
    model = (AutoModelForCausalLM.from_pretrained(policy, attn_implementation="sdpa") if policy else
             AutoModelForCausalLM.from_config(architecture_config(cfg.model, tok), attn_implementation="sdpa"))
    reference = AutoModelForCausalLM.from_pretrained(policy, attn_implementation="sdpa") if policy else None
    if reference is None:
        import copy

        reference = copy.deepcopy(model)
    # TRL's convention (its PPO example): the critic starts from the reward model.
    rm = settings["reward_model"]
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm, attn_implementation="sdpa")
    value_model = AutoModelForSequenceClassification.from_pretrained(rm, attn_implementation="sdpa")
    rows = load_examples(cfg.data, "ppo")
    encode = lambda split: Dataset.from_dict({"input_ids": [render_prompt(tok, r["prompt"]) for r in split]})  # noqa: E731
    per_step = settings["prompts"] * settings["grad_accum"]
    args = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-"), per_device_train_batch_size=settings["prompts"],
        gradient_accumulation_steps=settings["grad_accum"], num_mini_batches=1, num_ppo_epochs=settings["epochs"],
        total_episodes=settings["steps"] * per_step, local_rollout_forward_batch_size=per_step,
        response_length=settings["max_new_tokens"], temperature=1.0, stop_token="eos", kl_coef=s.kl_coef,
        gamma=s.gamma, lam=s.lam, cliprange=s.clip_range, cliprange_value=s.clip_range_value,
        vf_coef=s.value_loss_coef, learning_rate=1e-5, warmup_steps=1, num_sample_generations=0, report_to=[],
        save_strategy="no", logging_steps=10**6, seed=cfg.trainer.seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        # The job is fp32 without recomputation: TRL's PPO defaults to bf16 autocast and gradient
        # checkpointing (about 10x slower on a CPU in the SFT benchmark), and to the unfused AdamW.
        bf16=False, gradient_checkpointing=False, optim="adamw_torch_fused", weight_decay=0.0)
    clock = trl_clock()
    trainer = PPOTrainer(args=args, processing_class=tok, model=model, ref_model=reference,
                         reward_model=reward_model, value_model=value_model, train_dataset=encode(rows.train),
                         eval_dataset=encode(rows.val.select(range(per_step))), callbacks=[clock])
    if settings.get("without_gc"):
        # TRL calls gc.collect() twice per step (a third of its step here): this row leaves them out,
        # to show how much of the ratio they are.
        import types

        from trl.experimental.ppo import ppo_trainer

        ppo_trainer.gc = types.SimpleNamespace(collect=lambda: 0)
    trainer.train()
    n = args.num_total_batches * per_step
    return {"responses": n, "seconds": clock.seconds, "responses_per_second": n / clock.seconds,
            "trl": trl.__version__}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
