"""The pluggy markers of llmexp's hooks: ``hookspec`` for llmexp, ``hookimpl`` for plugin authors."""

from __future__ import annotations

import pluggy

PROJECT = "llmexp"
ENTRY_POINT_GROUP = "llmexp"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
