"""Name -> declaration registries built from the hooks: datasets, evals, rewards, tools; plus callbacks.

Each registry is collected once per process from every loaded plugin (llmexp's built-ins
included). A malformed declaration or a name declared twice is a PluginError naming the plugins;
:func:`registry_problems` collects those of every registry at once. A dataset's builder is handed
out checked: rows whose columns differ from the declared ``columns`` are the plugin's error.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Dict, Generic, Iterable, List, Optional, TypeVar

from llmexp.errors import Problem, UserError, suggest
from llmexp.plugins.declarations import DatasetDeclaration, EvalDeclaration, RewardDeclaration, ToolDeclaration
from llmexp.plugins.errors import PluginError
from llmexp.plugins.manager import BUILTIN, Host, PluginInfo, clash, host

T = TypeVar("T")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# hook -> (declaration type, what one entry is called in messages, its callable field)
KINDS = {
    "llmexp_datasets": (DatasetDeclaration, "dataset", "builder"),
    "llmexp_evals": (EvalDeclaration, "eval", "runner"),
    "llmexp_rewards": (RewardDeclaration, "reward", "fn"),
    "llmexp_tools": (ToolDeclaration, "tool", "fn"),
}


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A declaration and the plugin that declared it."""

    declaration: T
    owner: PluginInfo

    def describe(self, what: str) -> str:
        """``eval 'x'`` for llmexp's own, ``eval 'x' of plugin 'p' (dist 1.0)`` for a plugin's."""
        name = getattr(self.declaration, "name", "?")
        return f"{what} {name!r}" + ("" if self.owner == BUILTIN else f" of {self.owner}")


def datasets() -> Dict[str, Entry[DatasetDeclaration]]:
    return collect("llmexp_datasets")


def evals() -> Dict[str, Entry[EvalDeclaration]]:
    return collect("llmexp_evals")


def rewards() -> Dict[str, Entry[RewardDeclaration]]:
    return collect("llmexp_rewards")


def tools() -> Dict[str, Entry[ToolDeclaration]]:
    return collect("llmexp_tools")


def lookup(hook: str, name: str, key: str) -> Entry:
    """The entry called ``name``, or a UserError naming ``key`` and the valid names."""
    entries = collect(hook)
    if name not in entries:
        what = KINDS[hook][1]
        raise UserError(f"{key}: no {what} named {name!r} is registered; {suggest(name, entries)}")
    return entries[name]


def collect(hook: str, h: Optional[Host] = None) -> Dict[str, Entry]:
    """Every declaration returned by ``hook`` across plugins (of ``h``, default this process's), by
    name (cached per process)."""
    h = h or host()
    if hook not in h.cache:
        kind, what, call_field = KINDS[hook]
        entries: Dict[str, Entry] = {}
        problems: List[Problem] = []
        for info, result in h.call(hook):
            items = result if isinstance(result, (list, tuple)) else [result]
            for d in items:
                problem = _malformed(d, kind, call_field)
                if problem:
                    problems.append(Problem(str(info), f"{hook}() returned {problem}",
                                            f"return a list of llmexp.plugins.{kind.__name__}"))
                elif d.name in entries:
                    problems.append(clash(f"{what} {d.name!r}", f"{kind.__name__}({d.name!r}, ...)",
                                          entries[d.name].owner, info, h))
                else:
                    if isinstance(d, DatasetDeclaration) and d.columns is not None:
                        d = dataclasses.replace(d, builder=_checked_builder(d, info))
                    entries[d.name] = Entry(d, info)
        if problems:
            raise PluginError(problems)
        h.cache[hook] = entries
    return h.cache[hook]


def registry_problems(h: Optional[Host] = None) -> None:
    """Collect every registry (datasets, evals, rewards); their problems together are one
    PluginError (chained to the first plugin exception)."""
    problems: List[Problem] = []
    cause: Optional[BaseException] = None
    for hook in KINDS:
        try:
            collect(hook, h)
        except PluginError as e:
            problems.extend(e.problems)
            cause = cause or e.__cause__
    if problems:
        raise PluginError(problems) from cause


def _checked_builder(d: DatasetDeclaration, owner: PluginInfo):
    """``d.builder`` whose rows (dicts, or a ``datasets.Dataset``) must have exactly ``d.columns``."""
    declared = sorted(d.columns or ())
    build = d.builder

    def mismatch(columns: Iterable[str], where: str) -> PluginError:
        have = sorted(map(str, columns))
        missing, extra = sorted(set(declared) - set(have)), sorted(set(have) - set(declared))
        diff = "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                            f"undeclared {', '.join(extra)}" if extra else "") if part)
        return PluginError([Problem(str(owner), f"dataset {d.name!r} declares columns ({', '.join(declared)}), "
                                    f"but {where} has columns ({', '.join(have) or 'none'}): {diff}",
                                    f"make the builder's rows have exactly the declared columns, or correct "
                                    f"DatasetDeclaration(columns=...) (None when they depend on the options); "
                                    f"this is a bug of {owner.distribution or owner.module}")])

    def rows_checked(rows: Iterable[Any]):
        for n, row in enumerate(rows, 1):  # counted from 1, as every other message about rows counts
            if not hasattr(row, "keys") or sorted(map(str, row.keys())) != declared:
                raise mismatch(row.keys() if hasattr(row, "keys") else (), f"row {n}")
            yield row

    @functools.wraps(build)  # its name, in messages about it
    def checked(options: Any, seed: int) -> Any:
        rows = build(options, seed)
        if rows is None:  # said by the caller, which names the builder
            return None
        if hasattr(rows, "column_names"):  # a datasets.Dataset
            if sorted(rows.column_names) != declared:
                raise mismatch(rows.column_names, "the Dataset it built")
            return rows
        if isinstance(rows, (list, tuple)):
            for _ in rows_checked(rows):
                pass
            return rows
        return rows_checked(rows)

    return checked


def _malformed(d: Any, kind: type, call_field: str) -> str:
    if not isinstance(d, kind):
        return f"{d!r}, not a {kind.__name__}"
    if not isinstance(d.name, str) or not NAME.match(d.name):
        return f"a {kind.__name__} with an invalid name {d.name!r} (letters, digits, _ . -)"
    if not callable(getattr(d, call_field)):
        return f"{kind.__name__} {d.name!r} whose {call_field} is not callable"
    options = getattr(d, "options", None)
    if options is not None and not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        return f"{kind.__name__} {d.name!r} whose options is not a dataclass type"
    return ""


def plugin_callbacks(cfg: Any) -> List[Any]:
    """The extra Lightning callbacks every plugin's ``llmexp_callbacks(cfg)`` asks for this run."""
    from lightning.pytorch.callbacks import Callback

    callbacks, problems = [], []
    for info, result in host().call("llmexp_callbacks", cfg=cfg):
        for cb in result if isinstance(result, (list, tuple)) else [result]:
            if isinstance(cb, Callback):
                callbacks.append(reported(cb, info))
            else:
                problems.append(Problem(str(info), f"llmexp_callbacks() returned {cb!r}, not a Lightning "
                                        "Callback", "return a list of lightning.pytorch.callbacks.Callback"))
    if problems:
        raise PluginError(problems)
    return callbacks


def reported(callback: Any, info: PluginInfo) -> Any:
    """``callback`` whose own hooks, when they raise, raise a PluginError naming the plugin, the
    hook and the line (a plugin's callback failing in training gave a traceback and exit 1). Only
    the hooks its class overrides are wrapped, on the instance: its class, state_key and
    isinstance checks stay as they are."""
    from lightning.pytorch.callbacks import Callback

    from llmexp.plugins.errors import SKIP_HINT
    from llmexp.plugins.manager import raised_at

    def guard(hook: str, method: Any) -> Any:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - a plugin's bug, reported with its name and place
                raise PluginError([Problem(str(info), f"its callback {type(callback).__name__}.{hook}() raised "
                                           f"{type(e).__name__}: {e}{raised_at(e, info)}",
                                           f"fix the plugin, {SKIP_HINT}")]) from e
        return call

    for hook, base in vars(Callback).items():
        if hook.startswith("_") or not callable(base) or getattr(type(callback), hook, base) is base:
            continue
        setattr(callback, hook, guard(hook, getattr(callback, hook)))
    return callback
