"""What plugins return from the registry hooks: a name plus the code and typed options behind it.

Plain frozen dataclasses so that plugin modules can build them without importing anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple


@dataclass(frozen=True)
class DatasetDeclaration:
    """A dataset selectable as ``data=<config>`` whose yaml says ``source: bundled, name: <name>``.

    ``builder(options, seed)`` returns an iterable of row dicts (or a ``datasets.Dataset``);
    ``options`` is an instance of the ``options`` dataclass, built from ``data.options`` after
    validation (unknown keys, types and ``min``/``max``/``choices`` metadata are checked).
    ``columns`` are the columns of every row, so a stage/data mismatch is refused before
    anything is built; leave it None when they depend on the options.
    """

    name: str
    builder: Callable[[Any, int], Any]
    options: Optional[type] = None
    columns: Optional[Tuple[str, ...]] = None
    description: str = ""


@dataclass(frozen=True)
class EvalContext:
    """What an eval runner gets: the trained model (eval mode) and tokenizer, its typed options,
    the run directory to write details into (or None), and the run's RunConfig (or None)."""

    model: Any
    tokenizer: Any
    options: Any = None
    run_dir: Optional[Path] = None
    cfg: Any = None


@dataclass(frozen=True)
class EvalDeclaration:
    """An evaluation selectable by name in the eval group.

    ``runner(ctx: EvalContext)`` returns a mapping of metric name to number; llmexp stores each
    as ``<eval name>/<metric>``. ``options`` is the dataclass of its typed options (or None).
    """

    name: str
    runner: Callable[..., Any]
    options: Optional[type] = None
    description: str = ""


@dataclass(frozen=True)
class RewardDeclaration:
    """A named reward function for ppo/grpo: ``fn(completion, **columns) -> float``.

    ``completion`` is the generated text; the other keyword arguments are the prompt row's
    columns (e.g. ``answer``). Return a float; higher is better.
    """

    name: str
    fn: Callable[..., float]
    description: str = ""


@dataclass(frozen=True)
class ToolDeclaration:
    """A named function the rollout stages let the policy call while it answers
    (``stage.rollout.tools``): ``fn(**arguments) -> str``.

    The model is shown its schema (transformers' ``get_json_schema``: the type hints and the
    ``Args:`` of its docstring) through the chat template; a call's JSON arguments are passed as
    keyword arguments and the result (its ``str``) is written back as the tool's message.
    """

    name: str
    fn: Callable[..., Any]
    description: str = ""
