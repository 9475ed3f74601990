"""PluginError: what is wrong with which installed plugin, all problems at once (exit code 2)."""

from __future__ import annotations

from typing import Iterable, List

from llmexp.errors import Problem, UserError

SKIP_HINT = ("or skip plugins: LLMEXP_PLUGINS=<names to load> or LLMEXP_DISABLE_PLUGIN_AUTOLOAD=1 "
             "(list them: llmexp plugins)")


class PluginError(UserError):
    def __init__(self, problems: Iterable[Problem]):
        self.problems: List[Problem] = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} with llmexp plugins:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))
