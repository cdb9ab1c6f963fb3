"""The tree's architecture, checked: every import goes down the layers, and no import circle.

``LAYERS`` is the one place where the allowed direction is written down, lowest first: a module
may import modules of its own layer or of a layer below it, never one above. Imports inside
functions count too (a lazy import is still a dependency), and a circle of modules is refused
even within one layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, ...]] = [
    ("lhfs.core",),  # errors, sizes, names, crash-safe writes, processes
    ("lhfs.store",),  # one replica's copy on disk: layers, backing image, chunk store
    ("lhfs.wire",),  # the replica protocol and its client
    ("lhfs.replica",),  # the replica process
    ("lhfs.config",),  # a volume's durable record under a root
    ("lhfs.engine",),  # an attached volume: FUSE channel, frontend, engine, rebuild, scrub
    ("backupstore",),  # backups as objects in S3
    ("lhfs.volumes",),  # volume management, mount, backing images
    ("lhfs.backups",),  # backups, restores and DR of volumes
    ("lhfs.cli",),  # the command line
    ("lhfs.testing", "lhfs.__main__", "lhfs"),  # helpers for tests, demo and benchmarks
]


def layer_of(module: str) -> int:
    """The index of the layer ``module`` belongs to (the longest matching prefix wins)."""
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best < 0:
        raise AssertionError(f"module {module} belongs to no layer: add it to LAYERS")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The project modules that module ``name`` (its ``source``) imports, wherever the import
    statement stands."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` names a module; ``from mod import name`` names the module
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in ("lhfs", "backupstore") for p in (ROOT / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {
        module_name(p): imports_of(p.read_text(), module_name(p), p.name == "__init__.py", known)
        for p in files
    }


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Upward imports and circles in ``graph`` (module -> the modules it imports)."""
    problems = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    problems += [f"import circle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle for each strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_imports_go_down_the_layers_without_circles() -> None:
    graph = import_graph()
    assert "lhfs.engine.engine" in graph and "backupstore.store" in graph  # the walk found them
    assert violations(graph) == []


def test_the_check_sees_an_upward_import_and_a_circle() -> None:
    graph = {
        "lhfs.store.layer": {"lhfs.engine.engine"},  # upward
        "lhfs.engine.engine": set(),
        "lhfs.volumes.manage": {"lhfs.volumes.mount"},  # a circle within one layer
        "lhfs.volumes.mount": {"lhfs.volumes.manage"},
    }
    problems = violations(graph)
    assert any("lhfs.store.layer (layer 1) imports lhfs.engine.engine" in p for p in problems)
    assert any(p.startswith("import circle: lhfs.volumes.manage") for p in problems)


def test_lazy_and_relative_imports_count() -> None:
    known = {"lhfs.backups.dr", "lhfs.backups", "backupstore.s3", "backupstore.store"}
    source = "def f():\n    from lhfs.backups import dr\n\nfrom .s3 import Bucket\n"
    found = imports_of(source, "backupstore.store", False, known)
    assert found == {"lhfs.backups.dr", "lhfs.backups", "backupstore.s3"}
    assert any(
        "backupstore.store (layer 6) imports lhfs.backups.dr" in problem
        for problem in violations({"backupstore.store": found})
    )
