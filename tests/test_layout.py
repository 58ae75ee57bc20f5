"""The package's shape stays as the design says: data flows one way (no import circles, between modules or
between subpackages, lazy imports included), nothing below the experiment layer imports it, `losses.py`
imports nothing of the project, and every source file reads in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "wspo_lightning"
TOP = "wspo_lightning"
EXPERIMENT = ("pipeline", "demo", "study")  # the layer on top, with the commands that run it
MAY_IMPORT_EXPERIMENT = ("pipeline", "demo", "study", "cli", "tiny")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Project modules `name` imports, at any depth of its code (functions' lazy imports included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `from pkg import name`: the module is pkg
                target = target.rpartition(".")[0]
            if target.startswith(TOP) and target != name and target != TOP:
                found.add(target)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def component(name: str) -> str:
    """A module's subpackage or top-level module: wspo_lightning.data.records -> data."""
    return name.split(".")[1] if name.count(".") else name


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_reader_sees_lazy_and_relative_imports():
    assert "wspo_lightning.lightning_cli" in GRAPH["wspo_lightning.pipeline.fit"]  # imported inside fit()
    assert "wspo_lightning.data.tokenize" in GRAPH["wspo_lightning.data"]  # the package's re-exports
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_between_modules():
    # a package's __init__ re-exports its own modules, which import siblings by full path: not a circle
    graph = {
        name: {t for t in targets if not (MODULES[name].name == "__init__.py" and t.startswith(name + "."))}
        for name, targets in GRAPH.items()
    }
    assert find_cycle(graph) is None


def test_no_import_circle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        graph.setdefault(component(name), set()).update(
            component(t) for t in targets if component(t) != component(name)
        )
    assert find_cycle(graph) is None


@pytest.mark.parametrize("layer", EXPERIMENT)
def test_only_the_experiment_layer_and_commands_import_it(layer):
    importers = sorted(name for name, targets in GRAPH.items() if any(component(t) == layer for t in targets))
    assert [name for name in importers if component(name) not in MAY_IMPORT_EXPERIMENT] == []


def test_losses_import_nothing_of_the_project():
    assert GRAPH["wspo_lightning.losses"] == set()


def test_every_source_file_is_at_most_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
