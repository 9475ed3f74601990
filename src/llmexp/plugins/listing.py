"""``llmexp plugins``: the loaded plugins, their versions, and what each provides."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional

from llmexp import __version__
from llmexp.errors import UserError, report


def inventory() -> Dict[str, Any]:
    """Every loaded plugin with its distribution, version and provisions, as plain data."""
    from llmexp.paths import config_groups
    from llmexp.plugins.configs import plugin_config_dirs
    from llmexp.plugins.manager import host
    from llmexp.plugins.registry import datasets, evals, rewards

    h = host()
    config_groups()  # every plugin problem, the very ones a run or --help reports
    registries = {"datasets": datasets(), "evals": evals(), "rewards": rewards()}
    configs: Dict[str, List[str]] = {}
    for info, root in plugin_config_dirs():
        configs.setdefault(info.name, []).extend(
            f"{sub.name}={p.stem}" for sub in sorted(root.iterdir()) if sub.is_dir() for p in sorted(sub.glob("*.yaml")))
    plugins = []
    for obj, info in h.plugins:
        entry = {"name": info.name, "distribution": info.distribution, "version": info.version,
                 "module": info.module, "hooks": h.implemented(obj), "configs": configs.get(info.name, [])}
        for kind, entries in registries.items():
            entry[kind] = sorted(n for n, e in entries.items() if e.owner == info)
        plugins.append(entry)
    return {"llmexp_version": __version__, "autoload": h.autoload, "listed": h.listed, "plugins": plugins}


def render(inv: Dict[str, Any]) -> str:
    mode = ("autoload" if inv["autoload"] else
            f"only LLMEXP_PLUGINS={','.join(inv['listed'])}" if inv["listed"] else "autoload disabled")
    lines = [f"llmexp {inv['llmexp_version']} plugins ({mode}):"]
    for p in inv["plugins"]:
        where = f"{p['distribution']} {p['version']}" if p["distribution"] else "not installed as a distribution"
        lines.append(f"  {p['name']}  [{where}]  {p['module']}")
        for kind in ("datasets", "evals", "rewards", "configs"):
            if p[kind]:
                lines.append(f"      {kind}: {', '.join(p[kind])}")
        if "llmexp_callbacks" in p["hooks"]:
            lines.append("      callbacks: llmexp_callbacks(cfg)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="llmexp plugins", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")
    args = parser.parse_args(argv)
    try:
        inv = inventory()
    except UserError as e:
        return report(e)
    print(json.dumps(inv, indent=2) if args.json else render(inv))
    return 0
