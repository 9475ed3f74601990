"""What differs between runs: pure functions over their resolved configs, so a comparison names
runs by their settings (``lr=3e-4``) and shows only the columns that tell them apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from llmexp.plotting import describe

# Bookkeeping that differs between runs without changing what was trained (a sweep's trials run
# without a progress bar, and where the metrics go is not what was trained).
IGNORED = {"run_name", "resume", "trainer.progress_bar"}
IGNORED_GROUPS = ("logger.",)


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``; lists stay values."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def differing_keys(configs: Sequence[Dict[str, Any]]) -> List[str]:
    """Dotted keys whose value is not the same in every run (a missing key counts as a value),
    in config order. When a group's choice differs (``stage.name``: sft vs dpo) its other keys
    follow from that choice, so only ``<group>.name`` is kept for it, unless a key also differs
    between runs of the same choice (a sweep over ``data.options.style`` compared with a run on
    other data: the style was hidden, and two trials looked alike)."""
    flats = [flatten(c) for c in configs]
    keys: List[str] = []
    for flat in flats:
        keys += [k for k in flat if k not in keys]
    missing = object()
    differ = [k for k in keys if k not in IGNORED and not k.startswith(IGNORED_GROUPS)
              and len({repr(f.get(k, missing)) for f in flats}) > 1]
    chosen = {k.rsplit(".", 1)[0] for k in differ if k.endswith(".name") and "." in k}

    def within_a_choice(key: str, group: str) -> bool:
        values: Dict[str, set] = {}
        for f in flats:
            values.setdefault(repr(f.get(f"{group}.name", missing)), set()).add(repr(f.get(key, missing)))
        return any(len(v) > 1 for v in values.values())

    return [k for k in differ if k.endswith(".name") and k.count(".") == 1
            or all(within_a_choice(k, group) for group in chosen if k.startswith(f"{group}."))]


def run_labels(configs: Sequence[Dict[str, Any]], keys: Sequence[str], paths: Sequence[Path],
               most: int = 3) -> List[str]:
    """A legend name per run from its differing values: at most ``most`` keys, first those that
    tell the most runs apart (in config order among equals: runs that share a stage but differ in
    lr and seed are named by lr and seed), then the first others; the directory name only where
    no key differs, or where the chosen values still agree."""
    flats = [flatten(c) for c in configs]
    distinct = lambda ks: len({tuple(repr(f.get(k)) for k in ks) for f in flats})  # noqa: E731
    shown: List[str] = []
    while len(shown) < most and distinct(shown) < len(flats):
        gain, best = max(((distinct([*shown, k]), -i) for i, k in enumerate(keys) if k not in shown),
                         default=(0, 0))
        if gain <= distinct(shown):
            break
        shown.append(keys[-best])
    shown += [k for k in keys if k not in shown][: most - len(shown)]  # room left: the first others
    shown.sort(key=list(keys).index)
    labels = [describe(f, shown) if shown else Path(p).name for f, p in zip(flats, paths)]
    return [f"{label} ({Path(p).name})" if labels.count(label) > 1 and shown else label
            for label, p in zip(labels, paths)]
