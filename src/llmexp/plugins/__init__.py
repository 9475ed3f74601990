"""llmexp's plugin system (pluggy): hooks, the declarations plugins return, and the registries.

Plugin authors need ``llmexp.hookimpl`` and the declaration types exported here; the hooks are
documented in :mod:`llmexp.plugins.hookspecs` and the guide in docs/plugins.md.
"""

from __future__ import annotations

from typing import Any, List

from llmexp.plugins.declarations import (DatasetDeclaration, EvalContext, EvalDeclaration, RewardDeclaration,
                                         ToolDeclaration)
from llmexp.plugins.markers import hookimpl, hookspec

__all__ = ["DatasetDeclaration", "EvalContext", "EvalDeclaration", "RewardDeclaration", "ToolDeclaration", "hookimpl",
           "hookspec", "plugin_callbacks"]


def plugin_callbacks(cfg: Any) -> List[Any]:
    """Extra Lightning callbacks from every plugin's ``llmexp_callbacks(cfg)`` for this run."""
    from llmexp.plugins.registry import plugin_callbacks as collect

    return collect(cfg)
