"""Find, select, load and check plugins: llmexp's built-in one plus installed ``llmexp`` entry points.

Selection (environment): ``LLMEXP_PLUGINS=a,b`` loads only the named plugins (entry-point names,
or importable module names for plugins that are not installed as distributions);
``LLMEXP_DISABLE_PLUGIN_AUTOLOAD=1`` loads no installed plugin unless ``LLMEXP_PLUGINS`` names it.
The built-in plugin is always loaded. Every problem (import failure, unknown hook, a hook-named
function without ``@llmexp.hookimpl``, wrong hook signature, unsupported llmexp version, duplicate
plugin name) is collected into one PluginError.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Tuple

import pluggy

from llmexp import __version__
from llmexp.errors import Problem, UserError, suggest
from llmexp.plugins import hookspecs
from llmexp.plugins.errors import SKIP_HINT, PluginError
from llmexp.plugins.markers import ENTRY_POINT_GROUP, PROJECT

TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class PluginInfo:
    """Who a plugin is, for listings and for every message that blames it."""

    name: str
    distribution: Optional[str]
    version: Optional[str]
    module: str

    def __str__(self) -> str:
        where = f"{self.distribution} {self.version}" if self.distribution else f"module {self.module}"
        return f"plugin {self.name!r} ({where})"


BUILTIN = PluginInfo("llmexp", "llmexp", __version__, "llmexp.plugins.builtin")


class Host:
    """The pluggy manager of this process and what is known about each registered plugin."""

    def __init__(self, autoload: bool, listed: List[str]):
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: List[Tuple[Any, PluginInfo]] = []
        self.autoload, self.listed = autoload, listed
        self.cache: Dict[str, Any] = {}

    def register(self, obj: Any, info: PluginInfo) -> List[Problem]:
        """Register ``obj``; the Problems naming the plugin when its hooks do not fit the specs."""
        problems = unmarked_hooks(obj, info)
        try:
            self.pm.register(obj, name=info.name)
        except pluggy.PluginValidationError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            return problems + [Problem(str(info), "wrong hook signature: " + "; ".join(lines[1:] or lines),
                                       f"match the hookspec in llmexp.plugins.hookspecs "
                                       f"({_spec_signatures(self.pm)})")]
        except ValueError as e:
            return problems + [Problem(str(info), f"cannot be registered: {e}", SKIP_HINT)]
        unknown = [hc.name for hc in self.pm.get_hookcallers(obj) or [] if not hc.has_spec()]
        if unknown:
            problems.append(Problem(str(info), f"implements unknown hook {', '.join(repr(u) for u in unknown)}",
                                    suggest(unknown[0], hook_names())))
        if problems:
            self.pm.unregister(obj)
            return problems
        self.plugins.append((obj, info))
        return []

    def implemented(self, obj: Any) -> List[str]:
        return sorted(hc.name for hc in self.pm.get_hookcallers(obj) or [])

    def call(self, hook: str, **kwargs: Any) -> List[Tuple[PluginInfo, Any]]:
        """Each plugin's result of ``hook`` with the plugin it came from (results are collected)."""
        out, problems, cause = [], [], None
        for obj, info in self.plugins:
            if hook not in self.implemented(obj):
                continue
            others = [o for o, _ in self.plugins if o is not obj]
            try:
                results = self.pm.subset_hook_caller(hook, remove_plugins=others)(**kwargs)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - a plugin's bug, reported with its name and place
                problems.append(Problem(str(info), f"{hook}() raised {type(e).__name__}: {e}{raised_at(e, info)}",
                                        f"fix the plugin, {SKIP_HINT}"))
                cause = cause or e  # chained, so LLMEXP_TRACEBACK=1 shows the plugin's own frames
                continue
            out.extend((info, r) for r in results)
        if problems:
            raise PluginError(problems) from cause
        return out


def unmarked_hooks(obj: Any, info: PluginInfo) -> List[Problem]:
    """A function of the plugin named like a hook (``llmexp_...``) but not marked ``@llmexp.hookimpl``,
    which pluggy would silently ignore. Names starting with ``llmexp_`` are reserved for hooks."""
    problems = []
    known = hook_names()
    for name in sorted(dir(obj)):
        if not name.startswith(f"{PROJECT}_"):
            continue
        fn = getattr(obj, name, None)
        if not inspect.isroutine(fn) or hasattr(fn, f"{PROJECT}_impl") or hasattr(fn, f"{PROJECT}_spec"):
            continue
        where = _defined_at(fn)
        if name in known:
            problems.append(Problem(str(info), f"function {name}(){where} is not marked @llmexp.hookimpl, so "
                                    "llmexp would never call it", "mark it @llmexp.hookimpl (after import llmexp)"))
        else:
            problems.append(Problem(str(info), f"function {name}(){where} is named like a hook but is neither an "
                                    "llmexp hook nor marked @llmexp.hookimpl",
                                    f"{suggest(name, known)}; rename it to that hook and mark it @llmexp.hookimpl, "
                                    f"or give a helper a name not starting with {PROJECT}_ (reserved for hooks)"))
    return problems


def _defined_at(fn: Any) -> str:
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return f" ({code.co_filename}:{code.co_firstlineno})" if code else ""


def _plugin_roots(info: PluginInfo) -> List[str]:
    """The files and directories holding the plugin's code (its top-level package or module)."""
    top = sys.modules.get(info.module.split(":")[0].split(".")[0])
    roots = list(getattr(top, "__path__", None) or [])
    if not roots and getattr(top, "__file__", None):
        roots = [top.__file__]
    return [os.path.realpath(r) for r in roots]


def raised_at(error: BaseException, info: Optional[PluginInfo]) -> str:
    """`` (at FILE:LINE)``: the innermost frame of ``error`` in the plugin's own code (else, or
    without a plugin, the innermost frame outside llmexp and pluggy); empty when there is none."""
    if isinstance(error, SyntaxError) and error.filename:  # raised by the compiler: no frame of the file
        return f" (at {error.filename}:{error.lineno})"
    frames = traceback.extract_tb(error.__traceback__)
    roots = _plugin_roots(info) if info is not None else []
    ours = [os.path.dirname(os.path.realpath(m.__file__)) for m in (pluggy, sys.modules["llmexp"])]

    def inside(path: str, dirs: List[str]) -> bool:
        real = os.path.realpath(path)
        return any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in dirs)

    frame = next((f for f in reversed(frames) if inside(f.filename, roots)), None) if roots else None
    if frame is None:  # (importlib's frozen frames are no one's code to fix)
        frame = next((f for f in reversed(frames)
                      if not inside(f.filename, ours) and not f.filename.startswith("<")), None)
    return f" (at {frame.filename}:{frame.lineno})" if frame else ""


def clash(key: str, thing: str, first: PluginInfo, second: PluginInfo, h: Optional[Host] = None) -> Problem:
    """The one description of a name provided twice (``key``: ``dataset 'x'``, ``data=x``; ``thing``:
    what the second plugin would rename), used by the registries and the config groups alike, so
    ``llmexp plugins``, ``--help`` and a run all word it the same way."""
    if BUILTIN in (first, second):
        h = h or host()
        plugin = second if first == BUILTIN else first
        others = [i.name for _, i in h.plugins if i not in (BUILTIN, plugin)]
        load = (f"LLMEXP_PLUGINS={','.join(others)} (every loaded plugin but {plugin.name!r})" if others else
                "LLMEXP_DISABLE_PLUGIN_AUTOLOAD=1" + (" with LLMEXP_PLUGINS unset" if h.listed else ""))
        return Problem(key, f"declared by both llmexp itself (built-in) and {plugin}",
                       f"rename the plugin's {thing} (in {plugin.distribution or plugin.module}), or disable "
                       f"plugin {plugin.name!r}: {load}")
    return Problem(key, f"declared by both {first} and {second}",
                   "uninstall one of them, or choose which to load with LLMEXP_PLUGINS=<names>")


def hook_names() -> List[str]:
    return sorted(n for n in vars(hookspecs) if n.startswith(f"{PROJECT}_"))


def _spec_signatures(pm: pluggy.PluginManager) -> str:
    return ", ".join(f"{n}({', '.join(getattr(pm.hook, n).spec.argnames)})" for n in hook_names())


def selection(env: Mapping[str, str]) -> Tuple[bool, List[str]]:
    """(autoload installed plugins?, names listed in LLMEXP_PLUGINS)."""
    listed = [n.strip() for n in env.get("LLMEXP_PLUGINS", "").split(",") if n.strip()]
    autoload = env.get("LLMEXP_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in TRUE and not listed
    return autoload, listed


def installed_entry_points() -> Tuple[Dict[str, Any], List[Problem]]:
    """Entry points of the ``llmexp`` group by name; two distributions using one name is a problem."""
    from importlib.metadata import entry_points

    by_name: Dict[str, Any] = {}
    problems = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        seen = by_name.get(ep.name)
        if seen is None:
            by_name[ep.name] = ep
        elif _dist_name(seen) != _dist_name(ep):
            problems.append(Problem(f"plugin {ep.name!r}", f"is installed by two distributions: "
                                    f"{_dist_name(seen)} and {_dist_name(ep)}", "uninstall one of them"))
    return by_name, problems


def _dist_name(ep: Any) -> Optional[str]:
    return ep.dist.metadata["Name"] if ep.dist is not None else None


def _info(ep: Any) -> PluginInfo:
    version = ep.dist.version if ep.dist is not None else None
    return PluginInfo(ep.name, _dist_name(ep), version, ep.value)


def unsupported_llmexp(dist: Any) -> Optional[str]:
    """The distribution's requirement on llmexp when this llmexp version does not satisfy it."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    for line in (dist.requires or []) if dist is not None else []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != PROJECT or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        if req.specifier and not req.specifier.contains(__version__, prereleases=True):
            return str(req.specifier)
    return None


def _import_failed(info: PluginInfo, e: BaseException, fix: str, causes: List[BaseException]) -> List[Problem]:
    """The plugin that raised on import, where in its code (LLMEXP_TRACEBACK=1: the traceback, its
    frames included, as the error's cause)."""
    causes.append(e)
    what = f"failed to import {info.module}" if info.distribution else "failed to import"
    return [Problem(str(info), f"{what}: {type(e).__name__}: {e}{raised_at(e, info)}", fix)]


def _load_entry_point(host: Host, ep: Any, causes: List[BaseException]) -> List[Problem]:
    info = _info(ep)
    spec = unsupported_llmexp(ep.dist)
    if spec:
        return [Problem(str(info), f"supports llmexp {spec}, but this is llmexp {__version__}",
                        f"pip install -U {info.distribution} (a release supporting llmexp {__version__}), "
                        f"or pip install 'llmexp{spec}'; {SKIP_HINT}")]
    try:
        obj = ep.load()
    except Exception as e:  # noqa: BLE001 - any import-time failure is the plugin's
        return _import_failed(info, e, f"reinstall or fix {info.distribution}, {SKIP_HINT}", causes)
    return host.register(obj, info)


def _load_module(host: Host, name: str, installed: Dict[str, Any], causes: List[BaseException]) -> List[Problem]:
    info = PluginInfo(name, None, None, name)
    try:
        obj = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):  # (not its own missing dependency)
            return [Problem(f"LLMEXP_PLUGINS={name}", "no installed plugin or importable module of that name",
                            suggest(name, installed) if installed else "no llmexp plugins are installed")]
        return _import_failed(info, e, f"fix module {name}, {SKIP_HINT}", causes)
    except Exception as e:  # noqa: BLE001
        return _import_failed(info, e, f"fix module {name}, {SKIP_HINT}", causes)
    return host.register(obj, info)


def load(env: Optional[Mapping[str, str]] = None) -> Host:
    """A Host with the built-in plugin and the selected installed ones, or PluginError."""
    from llmexp.plugins import builtin

    autoload, listed = selection(os.environ if env is None else env)
    host = Host(autoload, listed)
    own = host.register(builtin, BUILTIN)
    if own:  # llmexp's own hooks must always fit its specs
        raise PluginError(own)
    installed, problems = installed_entry_points()
    if autoload:
        names = list(installed)
    else:
        names = list(dict.fromkeys(listed))
    causes: List[BaseException] = []
    for name in names:
        if name in installed:
            problems.extend(_load_entry_point(host, installed[name], causes))
        else:
            problems.extend(_load_module(host, name, installed, causes))
    if problems:
        error = PluginError(problems)
        error.loaded = host  # the plugins that did load: their own problems are said with these (configs)
        raise error from (causes[0] if causes else None)
    return host


@lru_cache(maxsize=1)
def host() -> Host:
    """This process's plugins, loaded once (a failed load is retried and reported again)."""
    return load()


def reset() -> None:
    """Forget the loaded plugins (the next lookup loads them again)."""
    host.cache_clear()
