"""llmexp: declarative, config-driven experiments for training language models."""

__version__ = "0.1.0"
