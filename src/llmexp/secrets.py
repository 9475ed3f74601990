"""Keep secrets out of every file a run writes (config.yaml, summary.json, overrides, W&B config).

A value is secret when its key names a key, token, secret or password (``hf_token``,
``api_key``, ``data.options.token``...) — but not the tokenizer's special tokens or counts of
tokens — or when it equals the value of a secret environment variable (WANDB_API_KEY, HF_TOKEN).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable

REDACTED = "***"
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "OPENAI_API_KEY")
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials", "auth"}
_NOT_SECRET = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}


def is_secret_key(key: str) -> bool:
    key = str(key).lower()
    if key in _NOT_SECRET:
        return False
    return any(part in _SECRET_WORDS for part in re.split(r"[^a-z0-9]+|_", key))


def _env_secrets() -> set:
    return {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}


def redact(value: Any, key: str = "", env: Iterable[str] | None = None) -> Any:
    """A copy of ``value`` with secret strings replaced by ``***``."""
    env = _env_secrets() if env is None else set(env)
    if isinstance(value, dict):
        return {k: redact(v, str(k), env) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, key, env) for v in value)
    if isinstance(value, str) and (is_secret_key(key) or value in env):
        return REDACTED
    return value


def redact_override(override: str) -> str:
    """``data.options.token=hf_x`` -> ``data.options.token=***`` (command-line overrides)."""
    key, sep, value = override.partition("=")
    if not sep:
        return override
    leaf = key.lstrip("+~").rsplit(".", 1)[-1]
    return f"{key}={REDACTED}" if is_secret_key(leaf) or value in _env_secrets() else override
