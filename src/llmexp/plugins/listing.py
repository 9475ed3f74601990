"""``llmexp plugins``: the loaded plugins, their versions, and what each provides."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional

from llmexp import __version__
from llmexp.errors import UserError, report
from llmexp.plugins.markers import ENTRY_POINT_GROUP


def inventory() -> Dict[str, Any]:
    """Every loaded plugin with its distribution, version and provisions, as plain data."""
    from llmexp.paths import config_groups
    from llmexp.plugins.configs import plugin_config_dirs
    from llmexp.plugins.manager import host
    from llmexp.plugins.registry import datasets, evals, rewards, tools

    config_groups()  # every plugin problem, the very ones a run or --help reports
    h = host()
    registries = {"datasets": datasets(), "evals": evals(), "rewards": rewards(), "tools": tools()}
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
    return {"llmexp_version": __version__, "autoload": h.autoload, "listed": h.listed, "plugins": plugins,
            "not_plugins": not_registered()}


def not_registered() -> List[Dict[str, Any]]:
    """Installed distributions that require llmexp but declare no entry point in its group: a plugin
    under another group name (``llmexp.plugins``) was loaded by nothing, and said by nothing."""
    import re
    from importlib.metadata import distributions

    out = []
    for dist in distributions():
        name = dist.metadata["Name"] or ""
        needs = [r for r in (dist.requires or []) if re.split(r"[\s;<>=!~\[(]", r, 1)[0].lower() == "llmexp"]
        if not needs or name.lower() == "llmexp":
            continue
        groups = sorted({ep.group for ep in dist.entry_points})
        if ENTRY_POINT_GROUP not in groups:
            out.append({"distribution": name, "entry_point_groups": groups})
    return sorted(out, key=lambda d: d["distribution"])


def render(inv: Dict[str, Any]) -> str:
    mode = ("autoload" if inv["autoload"] else
            f"only LLMEXP_PLUGINS={','.join(inv['listed'])}" if inv["listed"] else "autoload disabled")
    lines = [f"llmexp {inv['llmexp_version']} plugins ({mode}):"]
    for p in inv["plugins"]:
        where = f"{p['distribution']} {p['version']}" if p["distribution"] else "not installed as a distribution"
        lines.append(f"  {p['name']}  [{where}]  {p['module']}")
        for kind in ("datasets", "evals", "rewards", "tools", "configs"):
            if p[kind]:
                lines.append(f"      {kind}: {', '.join(p[kind])}")
        if "llmexp_callbacks" in p["hooks"]:
            lines.append("      callbacks: llmexp_callbacks(cfg)")
    for d in inv.get("not_plugins", []):
        groups = ", ".join(d["entry_point_groups"]) or "none"
        lines.append(f"  not loaded: {d['distribution']} requires llmexp but declares no entry point in the group "
                     f"'{ENTRY_POINT_GROUP}' (its groups: {groups}); fix: [project.entry-points.{ENTRY_POINT_GROUP}] "
                     f"<name> = \"<module>\" in its pyproject.toml (docs/plugins.md)")
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
