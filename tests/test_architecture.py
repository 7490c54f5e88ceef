"""The house's floors: no import cycles between secateurs' modules, counting imports inside functions.

A function-level import that dodges a cycle is a design smell, not a fix (STYLE.md): the shared
piece belongs a floor down. This test parses every module's imports (module level and inside
functions; ``if TYPE_CHECKING:`` blocks are left out, they never run) and fails on any cycle.
Importing ``a.b.c`` from outside package ``a.b`` also runs ``a.b``'s ``__init__``, so it counts as
importing that package too (the root package ``secateurs`` excepted: it only re-exports).
"""

from __future__ import annotations

import ast
from pathlib import Path

import secateurs

ROOT = Path(secateurs.__file__).parent
PACKAGE = "secateurs"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(PACKAGE):
                continue
            submodules = {f"{target}.{a.name}" for a in node.names} & set(known)
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in ``target`` itself
                found.add(target)
            elif not module.startswith(target + ".") and target != module:
                found.add(target)  # ``from pkg import sub`` from outside pkg runs pkg's __init__
    edges = set()
    for name in found:
        if name not in known:
            continue
        edges.add(name)
        parts = name.split(".")
        for i in range(2, len(parts)):  # the __init__ of every package on the way runs too, unless we are inside it
            parent = ".".join(parts[:i])
            if not module.startswith(parent + "."):
                edges.add(parent)
    edges.discard(module)
    return edges


def _graph() -> dict[str, set[str]]:
    known = _module_names()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycles_counting_function_level_imports():
    graph = _graph()
    assert len(graph) > 60 and any("runners" in m for m in graph)  # the parser saw the whole package
    cycles = _cycles(graph)
    detail = []
    for cycle in cycles:
        members = set(cycle)
        detail.append(" | ".join(f"{m} -> {sorted(graph[m] & members)}" for m in cycle))
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function():
    """The checker itself: a function-level back door is still an edge."""
    source = "def f():\n    from secateurs.a import x\n"
    tree = ast.parse(source)
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names == ["secateurs.a"]
    assert _cycles({"secateurs.a": {"secateurs.b"}, "secateurs.b": {"secateurs.a"}}) == [["secateurs.a", "secateurs.b"]]
    assert _cycles({"secateurs.a": {"secateurs.b"}, "secateurs.b": set()}) == []


def test_no_public_name_is_shadowed_by_a_submodule_of_the_same_name():
    """Importing ``secateurs.x`` sets the package attribute ``x`` to the module, which would hide a
    lazily exported name ``x`` (``secateurs.trial`` became a module once ``trial.py`` was imported)."""
    shadowed = sorted(name for name in secateurs.__all__ if (ROOT / f"{name}.py").exists() or (ROOT / name).is_dir())
    assert not shadowed, f"rename these modules, they shadow public names once imported: {shadowed}"
