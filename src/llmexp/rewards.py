"""Rewards for ppo/grpo: a registered reward function by name, or a reward model by directory.

Both score a batch of (prompt, completion text, row columns) and return one float per sample,
so the rollout engine does not care which it has.
"""

from __future__ import annotations

import inspect
import math
import numbers
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from llmexp.config.schema import RewardConfig
from llmexp.errors import UserError


def accepted_columns(fn) -> Optional[set]:
    """Column names a reward function takes (None: it takes **kwargs, so every column)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def load_reward_function(name: str, key: str):
    """(function, who provides it) for a registered reward name or a ``module:function`` path
    (a TRL reward such as ``trl.rewards:think_format_reward``, or one of the user's own)."""
    return load_function(name, key, "llmexp_rewards")


def load_function(name: str, key: str, hook: str):
    """(function, who provides it) for a name registered through ``hook`` (a reward, a tool) or a
    ``module:function`` path."""
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        try:
            loaded = importlib.import_module(module)
        except ImportError as e:
            what = "tool" if hook == "llmexp_tools" else "reward"
            raise UserError(f"{key}: cannot import {name!r} ({type(e).__name__}: {e}); give module:function of an "
                            f"importable module, or a registered {what} (llmexp plugins lists them)") from None
        if not callable(getattr(loaded, attr, None)):
            from llmexp.errors import suggest

            functions = [n for n, v in vars(loaded).items() if callable(v) and not n.startswith("_")]
            raise UserError(f"{key}: module {module!r} ({getattr(loaded, '__file__', '?')}) has no function {attr!r}; "
                            f"fix: {suggest(attr, functions)}") from None
        return getattr(loaded, attr), f"module {module}"
    from llmexp.plugins.registry import lookup

    entry = lookup(hook, name, key)
    return entry.declaration.fn, entry.owner


def is_batched(fn) -> bool:
    """TRL's convention: ``fn(completions, **kwargs) -> list[float]``, one call per batch, the
    columns as lists; llmexp's own: ``fn(completion, **columns) -> float``, one call per sample."""
    params = list(inspect.signature(fn).parameters)
    return bool(params) and params[0] == "completions"


def shown(value: Any, most: int = 60) -> str:
    """A value in a message: its repr, cut to ``most`` characters (a sampled completion can be long
    and full of odd bytes)."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 1] + "…"


def with_reference(cols: Dict[str, Any]) -> Dict[str, Any]:
    """A row's own answer (a prompt/completion row's ``completion``, a chat's last assistant turn) as
    ``reference``, the name the task metric passes it by: under its own name it collided with the
    sampled completion (every prompt/completion dataset failed with "multiple values for argument
    'completion'")."""
    if "completion" not in cols:
        return cols
    from llmexp.data.formats import answer_text

    out = {k: v for k, v in cols.items() if k != "completion"}
    out.setdefault("reference", answer_text(cols["completion"]))
    return out


class FunctionReward:
    """A reward function by registered name or ``module:function``. llmexp's kind takes one
    completion and the row's columns it names (columns it does not name are not passed, so one
    function serves datasets with extra columns); TRL's kind (first parameter ``completions``)
    takes the batch as TRL's GRPOTrainer passes it: ``prompts``, ``completions`` (as messages
    when the prompts are), and every column as a list."""

    def __init__(self, name: str, key: str = "stage.reward.function", workers: int = 0):
        self.key, self.workers = key, workers
        self.fn, self.owner = load_reward_function(name, key)
        self.name = name
        self.accepted = accepted_columns(self.fn)
        self.batched = is_batched(self.fn)
        self.signature = inspect.signature(self.fn)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
                 columns: Sequence[Dict[str, Any]]) -> torch.Tensor:
        if self.batched:
            return torch.tensor(self.batch(prompts, completions, columns), dtype=torch.float32)
        if self.workers and len(completions) > 1:
            from concurrent.futures import ThreadPoolExecutor

            # Threads: a slow reward waits on a sandbox, a server or a subprocess, not on Python.
            with ThreadPoolExecutor(min(self.workers, len(completions))) as pool:
                out = list(pool.map(self.one, completions, columns))
        else:
            out = [self.one(c, cols) for c, cols in zip(completions, columns)]
        return torch.tensor(out, dtype=torch.float32)

    def one(self, completion: str, cols: Dict[str, Any]) -> float:
        cols = with_reference(cols)
        passed = cols if self.accepted is None else {k: v for k, v in cols.items() if k in self.accepted}
        try:
            self.signature.bind(completion, **passed)
        except TypeError as e:  # said as what it is, not as the call's TypeError from inside the run
            name = getattr(self.fn, "__name__", "reward")
            raise UserError(f"{self.key}: reward {self.name!r} of {self.owner} cannot be called as "
                            f"{name}(completion, **columns) ({e}); the rows' columns are {sorted(cols)}; fix: take "
                            f"the completion first, then the columns it needs by name (def {name}(completion, "
                            f"{', '.join(sorted(cols)[:1]) or 'answer'}): ...), or **columns") from None
        try:
            value = self.fn(completion, **passed)
        except UserError:  # the reward's own message to the user (reference_match without references)
            raise
        except Exception as e:  # noqa: BLE001 - a plugin's bug: name it
            raise UserError(f"{self.key}: reward {self.name!r} of {self.owner} failed on {shown(completion)} with "
                            f"columns {sorted(passed)}: {type(e).__name__}: {e}{self._where(e)}") from e
        if isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(value, "ndim", None) == 0):
            if math.isfinite(float(value)):
                return float(value)
            # a NaN reward became a NaN loss, reported as an lr problem
            raise UserError(f"{self.key}: reward {self.name!r} of {self.owner} returned {float(value)} for "
                            f"{shown(completion)}; fix: return a finite number per completion")
        raise UserError(f"{self.key}: reward {self.name!r} of {self.owner} returned {shown(value)} "
                        f"({type(value).__name__}) for {shown(completion)}; fix: return one number (a float) per "
                        f"completion")

    def _where(self, error: BaseException) -> str:
        """`` (at FILE:LINE)`` in the reward's own code, as a plugin hook's failure says it."""
        from llmexp.plugins.manager import PluginInfo, raised_at

        return raised_at(error, self.owner if isinstance(self.owner, PluginInfo) else None)

    def batch(self, prompts: Sequence[Any], completions: Sequence[str], columns: Sequence[Dict[str, Any]]):
        conversational = bool(prompts) and isinstance(prompts[0], list)
        texts = [[{"role": "assistant", "content": c}] for c in completions] if conversational else list(completions)
        names = set.intersection(*(set(c) for c in columns)) if columns else set()
        kwargs = {"prompts": list(prompts), **{k: [c[k] for c in columns] for k in sorted(names)}}
        if self.accepted is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepted}
        try:
            out = list(self.fn(texts, **kwargs))
        except Exception as e:  # noqa: BLE001 - the user's function: name it
            raise UserError(f"{self.key}: reward {self.name!r} of {self.owner} failed on a batch of "
                            f"{len(texts)} completions with {sorted(kwargs)}: {type(e).__name__}: {e}"
                            f"{self._where(e)}") from e
        bad = next((i for i, v in enumerate(out) if not isinstance(v, (int, float)) or not math.isfinite(v)), None)
        if len(out) != len(texts) or bad is not None:
            what = f"{len(out)} value{'s' * (len(out) != 1)} for {len(texts)} completions" if len(out) != len(texts) \
                else f"{out[bad]!r} for completion {bad}"
            raise UserError(f"{self.key}: reward {self.name!r} of {self.owner} returned {what}; it must return "
                            f"one finite number per completion")
        return [float(v) for v in out]


class ModelReward:
    """A one-label sequence classifier (an rm run's ``model/``) scoring prompt + response as its
    own tokenizer and chat template render them, exactly as it was trained."""

    def __init__(self, path: str, batch_size: int = 32, normalize: bool = True):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (Path(path) / "config.json").is_file():
            raise UserError(f"stage.reward.model: {path!r} has no config.json; give an rm run's "
                            f"<run dir>/model directory")
        from llmexp.models.build import load_pretrained

        key = "stage.reward.model"
        self.model = load_pretrained(AutoModelForSequenceClassification, path, key, "a reward model"
                                     ).eval().requires_grad_(False)
        self.tokenizer = load_pretrained(AutoTokenizer, path, key, "a tokenizer")
        if self.model.config.num_labels != 1:
            raise UserError(f"stage.reward.model: {path!r} has {self.model.config.num_labels} labels; a reward "
                            f"model scores with one (train one with stage=rm)")
        self.path, self.batch_size = path, batch_size
        config = self.model.config
        self.center = float(getattr(config, "llmexp_score_center", 0.0)) if normalize else 0.0
        self.scale = float(getattr(config, "llmexp_score_scale", 1.0)) if normalize else 1.0

    def to(self, device) -> "ModelReward":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
                 columns: Sequence[Dict[str, Any]]) -> torch.Tensor:
        from llmexp.data.collate import pad_rows
        from llmexp.data.encode import render_prompt_response

        ids = [render_prompt_response(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        scores: List[torch.Tensor] = []
        for i in range(0, len(ids), self.batch_size):
            chunk = ids[i : i + self.batch_size]
            input_ids = pad_rows(chunk, self.tokenizer.pad_token_id).to(device)
            mask = pad_rows([[1] * len(r) for r in chunk], 0).to(device)
            scores.append(self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().cpu())
        return (torch.cat(scores) - self.center) / self.scale


def build_reward(cfg: RewardConfig):
    if cfg.model:
        return ModelReward(cfg.model, normalize=cfg.normalize)
    if not cfg.function:
        raise UserError("stage.reward: set stage.reward.function=<name> or stage.reward.model=<dir>")
    return FunctionReward(cfg.function, workers=cfg.workers)
