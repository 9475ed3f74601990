"""Config files contributed by plugins: their directories, and the options they add to each group.

The directories reach Hydra through ``hydra_plugins/llmexp_plugin_configs`` (a SearchPathPlugin,
so ``--help`` lists their options too) and llmexp's own override checks through
:func:`with_plugin_options`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from llmexp.errors import Problem, suggest
from llmexp.plugins.errors import PluginError
from llmexp.plugins.manager import BUILTIN, PluginInfo, clash, host


def plugin_config_dirs() -> List[Tuple[PluginInfo, Path]]:
    """(plugin, directory) for every directory returned by ``llmexp_config_dirs`` (cached)."""
    h = host()
    if "config_dirs" not in h.cache:
        dirs, problems = [], []
        for info, result in h.call("llmexp_config_dirs"):
            for d in result if isinstance(result, (list, tuple)) else [result]:
                path = Path(d) if isinstance(d, (str, Path)) else None
                if path is None or not path.is_dir():
                    problems.append(Problem(str(info), f"llmexp_config_dirs() returned {d!r}, not a directory",
                                            "return the absolute path of a directory shipped with the package"))
                else:
                    dirs.append((info, path.resolve()))
        if problems:
            raise PluginError(problems)
        h.cache["config_dirs"] = dirs
    return h.cache["config_dirs"]


def with_plugin_options(groups: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """``groups`` (llmexp's conf/) with every plugin's options added. Every plugin problem is a
    PluginError here, all at once: config options and registry names (datasets, evals, rewards)
    provided twice, malformed declarations, raising hooks. So ``llmexp plugins``, ``--help`` and
    every run refuse the same plugins with the same text."""
    from llmexp.plugins.registry import registry_problems

    owners: Dict[Tuple[str, str], PluginInfo] = {(g, o): BUILTIN for g, options in groups.items() for o in options}
    merged = {g: list(options) for g, options in groups.items()}
    problems = []
    try:
        dirs = plugin_config_dirs()
    except PluginError as e:  # a plugin that failed to load: said with what the others declare wrongly
        loaded = getattr(e, "loaded", None)
        if loaded is None:
            raise
        try:
            registry_problems(loaded)
        except PluginError as more:
            raise PluginError([*e.problems, *more.problems]) from (e.__cause__ or more.__cause__)
        raise
    for info, root in dirs:
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            if sub.name not in groups:
                problems.append(Problem(str(info), f"config directory {sub} is not an llmexp config group",
                                        suggest(sub.name, groups)))
                continue
            for option in sorted(p.stem for p in sub.glob("*.yaml")):
                owner = owners.setdefault((sub.name, option), info)
                if owner != info:
                    problems.append(clash(f"{sub.name}={option}", f"config file {sub.name}/{option}.yaml",
                                          owner, info))
                else:
                    merged[sub.name].append(option)
    cause = None
    try:
        registry_problems()
    except PluginError as e:
        problems.extend(e.problems)
        cause = e.__cause__
    if problems:
        raise PluginError(problems) from cause
    return {g: sorted(set(options)) for g, options in merged.items()}
