"""llmexp: declarative, config-driven experiments for training language models."""

__version__ = "0.1.0"

from llmexp.plugins.markers import hookimpl  # noqa: E402 - for plugin authors: @llmexp.hookimpl

__all__ = ["__version__", "hookimpl"]
