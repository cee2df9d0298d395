"""The package's layout: modules grouped by job, a short top level, and no import cycles — imports inside
functions included, since a lazy import still ties two modules together."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dgpo", "tdm_r1")
MAX_TOP_LEVEL_MODULES = 12


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its file. ``from P import x`` counts P.x when that is a
    module, else P; importing A.B.C from outside package A.B also runs A.B's ``__init__``, so that counts too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the module and the packages on its way
                prefix = ".".join(parts[:i])
                inside = name == prefix or name.startswith(prefix + ".")
                if prefix in modules and prefix != name and not (i < len(parts) and inside):
                    found.add(prefix)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_even_through_imports_inside_functions():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_lazy_import_cycle():
    graph = import_graph()
    graph["dgpo.errors"] = graph["dgpo.errors"] | {"dgpo.cli"}  # as if errors.py imported the CLI in a function
    assert any("dgpo.errors" in c and "dgpo.cli" in c for c in cycles(graph))


def test_dgpo_never_imports_tdm_r1():
    graph = import_graph()
    assert not [(a, b) for a, targets in graph.items() if a.startswith("dgpo") for b in targets
                if b.startswith("tdm_r1")]


def test_a_short_top_level():
    top = sorted(p.name for p in (ROOT / "dgpo").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
