"""The package's import graph: no cycles, and the layers point one way.

Every module of ``structkv`` (including ``structkv.export`` and ``structkv.runtime``, which live
in the top-level ``export/`` and ``runtime/`` folders) is parsed, and every import it makes —
at module level or inside a function — becomes an edge. Two rules:

- no cycle among modules (a function-level import that closes a loop is still a loop in the
  design, even when Python happens to tolerate it);
- core <- export, core <- runtime, core <- eval: the core package never imports the export,
  runtime or eval packages, and those three never import each other. The command-line front
  ends (``structkv.cli``, ``structkv.bench``) sit on top and may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"structkv": ROOT / "structkv", "structkv.export": ROOT / "export",
           "structkv.runtime": ROOT / "runtime"}  # fmt: skip
FRONT_ENDS = {"structkv.cli", "structkv.bench"}
LAYERS = ("structkv.export", "structkv.runtime", "structkv.eval")


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (``from a import b`` counts a.b when it is a
    module, else a)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            if target in known:
                out.add(target)
    # ``from structkv.x import y`` adds both structkv.x.y (if a module) and structkv.x; keep the
    # most specific one per statement by dropping a parent when a child was found.
    return {m for m in out if not any(o.startswith(m + ".") for o in out)} - {name}


def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(edges, 0)
    for root in edges:
        if colour[root]:
            continue
        stack = [(root, iter(sorted(edges[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif colour.get(child) == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(edges[child]))))
    return None


def _layer(module: str) -> str:
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    return "front end" if module in FRONT_ENDS else "core"


def test_the_walk_sees_every_package():
    edges = graph()
    assert {"structkv.prefill", "structkv.export.exporter", "structkv.runtime.engine",
            "structkv.eval.runner", "structkv.cli"} <= set(edges)  # fmt: skip
    assert "structkv.prefill" in edges["structkv.methods.base"]


def test_no_import_cycles():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


def test_layers_point_one_way():
    wrong = []
    for module, targets in graph().items():
        here = _layer(module)
        for target in targets:
            there = _layer(target)
            if here == "front end" or there in ("core", here):
                continue
            wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "edges, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": set(), "c": {"c"}}, ["c", "c"]),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
    ],
)
def test_the_cycle_finder_finds_cycles(edges, cycle):
    assert find_cycle(edges) == cycle
