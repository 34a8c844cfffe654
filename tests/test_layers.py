"""Layers import downward only: the package import graph, read from the source, has no cycle.

The order, low to high (DESIGN.md 15): core, and beside it forkserver (the simulation
pool's process server, which imports nothing of Shoal's, so that the command line can start
it before its own imports); datasets (users' data, partitioned) and features (the portable
feature modules that turn a client's raw records into features);
aggregation and telemetry; config; registry; privacy and secure; governance (the
update policy, signed models, attestation); tasks (the types
shared by client, coordinator and transport); client; transport; coordinator;
simulation; apps; dashboard (a viewer of runs); cli. Packages on one layer may
import each other, never in a cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "shoal"
LAYERS = [
    {"core", "forkserver"},
    {"datasets", "features", "preprocessing"},
    {"aggregation", "telemetry"},
    {"config"},
    {"registry"},
    {"privacy", "secure"},
    {"governance"},
    {"tasks"},
    {"client"},
    {"transport"},
    {"coordinator"},
    {"simulation"},
    {"apps"},
    {"dashboard"},
    {"cli", "__main__"},
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def package_of(path: Path) -> str:
    return path.relative_to(SOURCE).parts[0].removesuffix(".py")


def imported_packages(path: Path) -> set[str]:
    """The shoal packages a module imports, at run time or for type checking alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {name.split(".")[1] for name in names if name.startswith("shoal.")}
    return found


def import_graph() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the modules that import it."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in SOURCE.rglob("*.py"):
        if "_generated" in path.parts or (path.name == "__init__.py" and path.parent == SOURCE):
            continue
        source = package_of(path)
        for target in imported_packages(path) - {source}:
            graph[source][target].add(str(path.relative_to(SOURCE)))
    return graph


def test_every_package_has_a_layer() -> None:
    packages = {package_of(path) for path in SOURCE.rglob("*.py") if path.parent != SOURCE}
    packages |= {path.stem for path in SOURCE.glob("*.py") if path.name != "__init__.py"}
    assert packages - set(RANK) == set()


def test_no_package_imports_a_higher_layer() -> None:
    upward = [
        f"{source} -> {target} in {sorted(modules)}"
        for source, targets in import_graph().items()
        for target, modules in targets.items()
        if RANK[target] > RANK[source]
    ]
    assert upward == []


def find_cycle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize(
    ("graph", "cyclic"),
    [
        ({"a": {"b": {"x"}}, "b": {"c": {"y"}}, "c": {"a": {"z"}}}, True),
        ({"a": {"b": {"x"}}, "b": {"c": {"y"}}}, False),
        ({}, False),
    ],
)
def test_the_cycle_finder_finds_cycles(graph: dict[str, dict[str, set[str]]], cyclic: bool) -> None:
    assert (find_cycle(graph) is not None) is cyclic
