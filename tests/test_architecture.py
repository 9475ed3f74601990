"""The code's shape: no import cycles in src/, config/ at the bottom, one stage registry."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from llmexp.config.stages import STAGES

SRC = Path(__file__).resolve().parents[1] / "src" / "llmexp"
CONF = SRC.parents[1] / "conf"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """Module -> the llmexp modules it imports, at the top or inside functions."""
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("llmexp"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("llmexp")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50
    assert cycles(graph) == []
    # the checker itself finds one
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_config_is_the_bottom_layer():
    """config/ imports only config/ and errors: checks needing data, plugins or evals are preflight's."""
    graph = import_graph()
    config = {m: deps for m, deps in graph.items() if m.startswith("llmexp.config")}
    assert "llmexp.config.check" in config and "llmexp.config.stages" in config
    upward = {m: sorted(d for d in deps if not d.startswith("llmexp.config") and d != "llmexp.errors")
              for m, deps in config.items()}
    assert {m: d for m, d in upward.items() if d} == {}


def test_the_config_check_and_the_stage_registry_import_without_torch():
    code = ("import sys\nimport llmexp.config.check, llmexp.config.stages\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_stage_has_one_row_one_yaml_and_a_class():
    assert sorted(STAGES) == sorted(p.stem for p in (CONF / "stage").glob("*.yaml"))
    for name, spec in STAGES.items():
        assert spec.schema().name == name
        assert spec.load().__name__ == spec.cls.split(":")[1]
        assert spec.formats and spec.head in ("causal_lm", "score")
