"""PluginError: what is wrong with which installed plugin, all problems at once (exit code 2)."""

from __future__ import annotations


from llmexp.errors import ProblemsError

SKIP_HINT = ("or skip plugins: LLMEXP_PLUGINS=<names to load> or LLMEXP_DISABLE_PLUGIN_AUTOLOAD=1 "
             "(list them: llmexp plugins)")


class PluginError(ProblemsError):
    where = "with llmexp plugins"
