"""No import cycles among the project's modules (`sealong/` and `kernels/sealong_kernels/`).

An edge A -> B is any `import` / `from ... import` statement in A that names module B, at module level or inside a
function (a lazy import still makes the two files depend on each other). `from pkg import name` is an edge to
`pkg.name` when that is a module, else to `pkg` (its __init__). A cycle is a strongly connected component of more
than one module; each is reported with the lines that close it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sealong": ROOT / "sealong", "sealong_kernels": ROOT / "kernels" / "sealong_kernels"}


def project_modules() -> dict:
    """{dotted module name: path} of every .py file of the packages."""
    modules = {}
    for name, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name, *parts])] = path
    return modules


def imports_of(name: str, path: Path, modules: dict):
    """Yield (imported project module, line) for every import statement of the module `name`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    yield f"{target}.{alias.name}", node.lineno
                elif target in modules:
                    yield target, node.lineno


def import_graph() -> dict:
    """{module: {imported module: first line}} over the project's modules."""
    modules = project_modules()
    graph = {m: {} for m in modules}
    for m, path in modules.items():
        for target, line in imports_of(m, path, modules):
            if target != m:
                graph[m].setdefault(target, line)
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative), each sorted."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def describe(graph: dict, component: list) -> str:
    members = set(component)
    edges = [f"{a} -> {b} (line {line})" for a in component for b, line in graph[a].items() if b in members]
    return "; ".join(edges)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"d": 5}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_imports_of_resolves_relative_and_package_imports(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\nfrom .b import x\ndef f():\n    from p import c\n")
    modules = {"p": pkg / "__init__.py", "p.a": pkg / "a.py", "p.b": pkg / "b.py", "p.c": pkg / "c.py"}
    assert list(imports_of("p.a", pkg / "a.py", modules)) == [("p.b", 1), ("p.b", 2), ("p.c", 4)]


def test_no_import_cycles_among_project_modules():
    graph = import_graph()
    assert len(graph) > 50  # both packages were read
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(describe(graph, c) for c in found)
