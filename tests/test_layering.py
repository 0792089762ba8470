"""The package's import graph: no cycles, not even through imports inside functions, and the
core never imports the driver, the CPU speed-ups, the facade or the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import aenet_fn

PACKAGE = Path(aenet_fn.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The aenet_fn modules ``path`` imports anywhere in its code (``from a.b import c`` counts
    as ``a.b.c`` where that is a module, else ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.add(target if target in modules else node.module)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    """Every aenet_fn module and the aenet_fn modules it imports (a package's own
    ``__init__`` left out of its submodules' edges: Python runs it first anyway)."""
    modules = _modules()
    return {
        name: {t for t in _imports(path, modules) if not name.startswith(t + ".")} - {name}
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for other in sorted(graph[node]):
            if state.get(other) == 1:
                return [*stack[stack.index(other) :], other]
            if other not in state and (found := visit(other)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


LAYERS = ("core", "speedups", "io", "driver")
"""The layered subpackages, lowest first; each may import only itself and the ones before it
(``io`` reads and writes the core's records; the driver uses all three)."""


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a layer to a layer above it or to the facade, as ``a -> b``."""
    found = []
    for name, targets in sorted(graph.items()):
        layer = _layer(name)
        if layer is not None:
            allowed = set(LAYERS[: LAYERS.index(layer) + 1])
            found += [f"{name} -> {t}" for t in sorted(targets) if _layer(t) not in allowed]
    return found


def test_each_layer_imports_only_itself_and_the_layers_below():
    graph = import_graph()
    assert {_layer(name) for name in graph} >= set(LAYERS)
    assert upward_imports(graph) == []


def test_the_layer_check_finds_planted_upward_imports():
    graph = {
        "aenet_fn.core.a": {"aenet_fn.speedups.b", "aenet_fn.core.c"},
        "aenet_fn.speedups.b": {"aenet_fn.core.c"},
        "aenet_fn.io.d": {"aenet_fn.calculator"},
        "aenet_fn.calculator": {"aenet_fn.driver.e"},
    }
    assert upward_imports(graph) == [
        "aenet_fn.core.a -> aenet_fn.speedups.b",
        "aenet_fn.io.d -> aenet_fn.calculator",
    ]


MODULE_LINES = 650
"""Modules stay under about 600 lines; a longer one says why at its top."""


def test_a_long_module_says_why_at_its_top():
    long = {}
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MODULE_LINES:
            long[name] = ast.get_docstring(ast.parse(text)) or ""
    unexplained = sorted(name for name, doc in long.items() if "Why one module" not in doc)
    assert not unexplained, unexplained
    assert 0 < len(long) <= 5, sorted(long)
