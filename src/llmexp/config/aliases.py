"""Keys as users bring them from TRL's trainer configs, mapped to llmexp's: an override of one
gets "llmexp calls it ..." as its fix instead of a list of valid keys."""

from __future__ import annotations

from typing import Optional

_ROLLOUT_STAGES = ("ppo", "grpo", "rloo")
_SAMPLING_STAGES = (*_ROLLOUT_STAGES, "online_dpo")

# key -> (llmexp's key, the stages it applies to; empty: every stage)
ALIASES = {
    "stage.beta": ("stage.kl_coef", _ROLLOUT_STAGES),  # TRL's GRPO beta; llmexp's beta is dpo's temperature
    "stage.simpo_gamma": ("stage.gamma", ("simpo",)),
    "stage.lambda": ("stage.beta", ("orpo",)),  # the ORPO paper's name; TRL's is beta, as llmexp's
    "stage.kl_beta": ("stage.kl_coef", _ROLLOUT_STAGES),
    "stage.num_generations": ("stage.group_size", ("grpo", "rloo")),
    "stage.epsilon": ("stage.clip_range", ("grpo", "rloo")),
    "stage.cliprange": ("stage.clip_range", ("ppo",)),
    "stage.cliprange_value": ("stage.clip_range_value", ("ppo",)),
    "stage.vf_coef": ("stage.value_loss_coef", ("ppo",)),
    "stage.num_ppo_epochs": ("stage.ppo_epochs", ("ppo",)),
    "stage.num_iterations": ("stage.epochs", ("grpo", "rloo")),
    "stage.max_completion_length": ("stage.rollout.max_new_tokens", (*_SAMPLING_STAGES, "distill")),
    "stage.max_new_tokens": ("stage.rollout.max_new_tokens", (*_SAMPLING_STAGES, "distill")),  # TRL's Online DPO, GKD
    "stage.response_length": ("stage.rollout.max_new_tokens", ("ppo",)),
    "stage.temperature": ("stage.rollout.temperature", _SAMPLING_STAGES),
    "optim.learning_rate": ("optim.lr", ()),
    "optim.lr_scheduler_type": ("optim.scheduler", ()),
    "trainer.learning_rate": ("optim.lr", ()),
    "trainer.per_device_train_batch_size": ("trainer.micro_batch_size", ()),
    "trainer.per_device_eval_batch_size": ("trainer.val_batch_size", ()),
    "trainer.gradient_accumulation_steps": ("trainer.grad_accum", ()),
    "trainer.max_grad_norm": ("trainer.gradient_clip_val", ()),
    "trainer.eval_steps": ("trainer.val_check_interval", ()),
    "trainer.save_steps": ("trainer.checkpoint_every_n_steps", ()),
    "trainer.save_total_limit": ("trainer.keep_checkpoints", ()),
    "trainer.logging_steps": ("trainer.log_every_n_steps", ()),
}


def alias_hint(key: str, stage: Optional[str]) -> Optional[str]:
    """The fix for an unknown ``key`` that is another framework's name for an llmexp key."""
    target, stages = ALIASES.get(key, (None, ()))
    if target is None or (stages and stage not in stages):
        return None
    return f"llmexp calls it {target} (this is TRL's name)"
