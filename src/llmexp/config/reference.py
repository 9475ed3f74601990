"""The config reference: every key's type, default, allowed values and help, read from the
schemas (llmexp.config.schema, their one source), so that ``--help`` and docs/config.md show what
the checker enforces and cannot drift from it.

``python -m llmexp.config.reference > docs/config.md`` regenerates the page; a test fails when the
page is stale. Pure and torch-free, like the rest of config/.
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from llmexp.config import schema as S
from llmexp.config.stages import STAGES

PAGE_COMMAND = "python -m llmexp.config.reference > docs/config.md"


@dataclass(frozen=True)
class Entry:
    """One key of a schema: ``section`` keys are nested configs whose own keys follow them."""

    key: str
    type: str
    default: Any
    allowed: str
    help: str
    section: bool = False


def entries(schema: type, prefix: str = "", nested: Optional[Mapping[str, type]] = None) -> Iterator[Entry]:
    """Every key of ``schema`` (dotted, after ``prefix``), depth first; ``nested`` gives the schema
    of a field typed loosely (RunConfig.stage, whose keys depend on the stage)."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        sub = (nested or {}).get(f.name) or (type(default) if dataclasses.is_dataclass(default) else None)
        many = typing.get_origin(hints[f.name]) in (list, List)
        yield Entry(key, "section" if sub else type_name(hints[f.name]), None if sub else default,
                    allowed(f.metadata, many), f.metadata.get("help", ""), section=sub is not None)
        if sub:
            yield from entries(sub, key + ".")
        element = typing.get_args(hints[f.name])[0] if many and typing.get_args(hints[f.name]) else None
        if element is not None and dataclasses.is_dataclass(element):  # each item's keys: data.mixture[].weight
            yield from entries(element, key + "[].")


def run_entries(stage: Optional[str]) -> Iterator[Entry]:
    """Every key of a run's config with ``stage`` chosen (None or an unknown stage: no stage keys)."""
    spec = STAGES.get(stage) if stage else None
    for e in entries(S.RunConfig, nested={"stage": spec.schema} if spec else {}):
        if spec or not e.key.startswith("stage."):
            yield e


def type_name(hint: Any) -> str:
    """``int``, ``str or null``, ``list of float``: a type as the YAML user meets it."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union and len(args) == 1:
        return f"{type_name(args[0])} or null"
    if origin in (list, List):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin in (dict, Dict):
        return "mapping"
    return "any" if hint is Any else getattr(hint, "__name__", str(hint))


def allowed(meta: Mapping[str, Any], many: bool = False) -> str:
    """The choices or bounds of a field's metadata (of each item when ``many``), in words ("" when
    it has neither)."""
    if meta.get("choices") is not None:
        return ("each one of " if many else "one of ") + ", ".join("null" if c is None else str(c) for c in meta["choices"])
    lo, hi = meta.get("min"), meta.get("max")
    if meta.get("above") is not None:
        return f"> {meta['above']}"
    if lo is not None and hi is not None:
        return f"{lo} to {hi}"
    if lo is not None:
        return f">= {lo}"
    return f"<= {hi}" if hi is not None else ""


def flow(value: Any) -> str:
    """A value as YAML writes it inline: ``null``, ``true``, ``[0.9, 0.95]``, ``{}``."""
    return yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()[1:-1]


# -- the composed config with its help ------------------------------------------------------------

def annotated_yaml(cfg: DictConfig, width: int = 100) -> str:
    """``cfg`` as YAML (interpolations unresolved, as ``--cfg job`` prints it), each key preceded by
    its help and allowed values as ``#`` comments; the stage's keys get the chosen stage's help."""
    docs = {e.key: e for e in run_entries(OmegaConf.select(cfg, "stage.name"))}
    lines: List[str] = []
    _annotate(OmegaConf.to_container(cfg, resolve=False), "", 0, docs, width, lines)
    return "\n".join(lines) + "\n"


def _annotate(node: Dict[str, Any], prefix: str, depth: int, docs: Mapping[str, Entry], width: int,
              lines: List[str]) -> None:
    indent = "  " * depth
    for key, value in node.items():
        entry = docs.get(prefix + str(key))
        if depth == 0 and lines:
            lines.append("")
        if entry is not None:
            lines += _comment(entry, indent, width)
        if entry is not None and entry.section and isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            _annotate(value, f"{prefix}{key}.", depth + 1, docs, width, lines)
        else:
            dumped = OmegaConf.to_yaml(OmegaConf.create({key: value})).rstrip("\n")
            lines += [indent + line for line in dumped.split("\n")]


def _comment(entry: Entry, indent: str, width: int) -> List[str]:
    """The help of ``entry`` as wrapped ``#`` lines, its allowed values kept whole at the end."""
    lines = textwrap.wrap(entry.help, width, initial_indent=indent + "# ", subsequent_indent=indent + "# ",
                          break_on_hyphens=False)
    suffix = f"({entry.allowed})" if entry.allowed else ""
    if suffix and lines and len(lines[-1]) + 1 + len(suffix) <= width:
        lines[-1] += " " + suffix
    elif suffix:
        lines.append(f"{indent}# {suffix}")
    return lines


# -- docs/config.md -------------------------------------------------------------------------------

def markdown() -> str:
    """docs/config.md: the top-level keys, every group's keys, and every stage's keys."""
    run = {e.key: e for e in entries(S.RunConfig) if "." not in e.key}
    out = [
        "# Configuration reference",
        "",
        "Generated from the schemas in `src/llmexp/config/schema.py` by",
        "",
        f"    {PAGE_COMMAND}",
        "",
        "Do not edit it by hand: a test fails when it is out of date. The defaults are the schemas'; a",
        "group option (`conf/<group>/<option>.yaml`), a stage's file (`conf/stage/<name>.yaml`, which",
        "also sets optim and trainer keys) and `conf/scale/` may set others.",
        "`python -m llmexp [overrides] --help` prints the config a run gets, with this help by each key.",
        "",
        "## Top level",
        "",
        *_table(e for e in run.values() if not e.section),
    ]
    for group, schema in S.GROUP_SCHEMAS.items():
        out += ["", f"## {group}", "", _md(run[group].help), "", *_table(entries(schema, group + "."))]
    out += ["", "## stage", "", _md(run["stage"].help)]
    for name, spec in STAGES.items():
        out += ["", f"### stage={name}", "", _md(S.summary(spec.schema)), "",
                *_table(entries(spec.schema, "stage."))]
    return "\n".join(out) + "\n"


def _table(rows) -> List[str]:
    out = ["| key | type | default | allowed | help |", "|---|---|---|---|---|"]
    for e in rows:
        default = "" if e.section else f"`{flow(e.default)}`"
        out.append(f"| `{e.key}` | {e.type} | {default} | {_md(e.allowed)} | {_md(e.help)} |")
    return out


def _md(text: str) -> str:
    """Plain text safe in a table cell (no HTML tags, emphasis or cell breaks made of it)."""
    return text.replace("|", "&#124;").replace("<", "&lt;").replace("*", "\\*")


def main() -> None:
    print(markdown(), end="")


if __name__ == "__main__":
    main()
