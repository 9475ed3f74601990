"""The dataclass schemas are the one source of defaults: registered as Hydra's base configs, so
every YAML under conf/ says only what it sets differently (tests/test_config.py fails on a YAML
value that repeats its default).

conf/config.yaml composes ``_schema_defaults`` (every group's schema) first, and each
conf/stage/<name>.yaml composes ``/_stage_defaults_<name>@stage`` (its stage's schema) before its
own settings; the composed config, ``--cfg job`` and ``--help`` then show every key with its value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

from llmexp.config import schema as S
from llmexp.config.stages import STAGES

_registered = False


def root_defaults() -> Dict[str, Any]:
    """Every key of the run config but the stage's, at its schema default."""
    values = _plain(dataclasses.asdict(S.RunConfig()))
    values.pop("stage")
    # No default path: data=files and data=hf require one (``???`` in their YAML), and a merged
    # default would silently fill it (OmegaConf keeps a value that ??? is merged onto).
    values["data"].pop("path")
    return values


def stage_defaults(name: str) -> Dict[str, Any]:
    return _plain(dataclasses.asdict(STAGES[name].schema()))


def _plain(value: Any) -> Any:
    """Tuples as lists: what OmegaConf and YAML hold."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def register() -> None:
    """Store the defaults in Hydra's ConfigStore (once per process, before any composition)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="_schema_defaults", node=root_defaults())
    for name in STAGES:  # group-less, so that --help lists no extra config group
        store.store(name=f"_stage_defaults_{name}", node=stage_defaults(name))
    _registered = True
