"""The layers of ../shared/DESIGN.md hold in the code: every import inside the package
points down (or sideways within a layer) and no two modules import each other, directly
or around a circle. Imports inside functions count: a lazy import is still an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "falconet"

# Top-level packages and modules by layer, lowest first (docs/design.md draws them).
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"errors", "durable"}),
    ("storage", {"weights", "quant", "documents", "access"}),
    ("model", {"nn", "models"}),
    ("generation", {"sampling", "request_rules", "tokenizer", "generate", "constraints", "tools"}),
    ("engine", {"engine", "parallel"}),  # parallel: rank 0 drives, the others follow
    ("api", {"llm", "perplexity", "convert", ""}),  # "" = falconet/__init__.py
    ("faces", {"rag", "train", "server", "batch"}),
    ("cli", {"cli", "__main__"}),
]
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = ["falconet", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The falconet modules `name` imports (a `from pkg import mod` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m == "falconet" or m.startswith("falconet.")} - {name}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def test_every_module_has_a_layer():
    missing = sorted({unit(m) for m in modules()} - set(RANK))
    assert not missing, f"add {missing} to a layer in LAYERS (and to docs/design.md)"


def test_imports_point_down():
    upward = [
        f"{a} ({LAYERS[RANK[unit(a)]][0]}) imports {b} ({LAYERS[RANK[unit(b)]][0]})"
        for a, targets in graph().items()
        for b in sorted(targets)
        if RANK[unit(b)] > RANK[unit(a)]
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_between_modules():
    assert cycles(graph()) == []


def test_no_import_circle_between_packages():
    units: dict[str, set[str]] = {}
    for a, targets in graph().items():
        units.setdefault(unit(a), set()).update(unit(b) for b in targets if unit(b) != unit(a))
    assert cycles(units) == []


@pytest.mark.parametrize(
    "edges,expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_cycle_finder_finds_circles(edges, expected):
    assert cycles(edges) == expected


def test_import_reader_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "import falconet.tokenizer\n"
        "from falconet import documents\n"
        "from falconet.engine import Engine\n"
        "def late():\n    from ..server import app\n"
    )
    known = {"falconet.documents", "falconet.server.app"}
    got = imports_of("falconet.rag.mod", source, known)
    assert got == {
        "falconet.tokenizer",
        "falconet.documents",
        "falconet.engine",
        "falconet.server.app",
    }
