"""llmexp: declarative, config-driven experiments for training language models."""

__version__ = "0.1.0"

from llmexp.env import quiet_import_warnings  # noqa: E402
from llmexp.plugins.markers import hookimpl  # noqa: E402 - for plugin authors: @llmexp.hookimpl

quiet_import_warnings()  # before any entry point imports transformers (which imports torchao)

__all__ = ["__version__", "hookimpl"]
