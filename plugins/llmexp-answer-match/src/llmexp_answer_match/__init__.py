"""llmexp-answer-match: score generated numeric answers — an eval for models, a reward for ppo/grpo."""

__version__ = "0.1.0"
