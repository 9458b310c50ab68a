"""The package's layers, read from the code: imports point one way and no modules import each
other in a loop. Imports inside functions count too (a lazy import is still a dependency).

The map (docs/architecture.md, "Who owns what"), lowest first: ``losses`` and ``progress``
import no other nemo_aot package; ``distributed`` and ``data`` sit on them; ``models`` on
``distributed`` and ``losses`` (never on ``data``); ``conversion`` on ``models``;
``algorithms`` and ``scoring`` on everything below; ``generation`` on ``scoring`` (it restores
the policy the same way); ``launcher`` and ``cli`` on top.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "nemo_aot")
# package -> the nemo_aot packages it may import (the top-level module nemo_aot itself, which
# holds the version, is free to all)
BELOW = {
    "progress": set(), "losses": set(),
    "distributed": {"losses", "progress"},
    "data": {"progress"},
    "models": {"distributed", "losses", "progress"},
    "conversion": {"models", "distributed", "losses", "progress"},
}
BELOW["algorithms"] = BELOW["scoring"] = {"data", "conversion", *BELOW["conversion"]}
BELOW["generation"] = {"scoring", *BELOW["scoring"]}
BELOW["launcher"] = {"algorithms", *BELOW["algorithms"]}
BELOW["cli"] = {"launcher", "scoring", "generation", *BELOW["launcher"]}


def _modules() -> dict:
    found = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = path
    return found


def _imports(module: str, path: str) -> set:
    """nemo_aot modules ``module`` imports, anywhere in its code."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    targets = set()
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [f"{name}.{a.name}" for a in node.names]  # a module, or a name in one
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        targets.update(n for n in names if n.split(".")[0] == "nemo_aot")
    return targets


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    edges = {}
    for module, path in modules.items():
        # `from pkg import name` names a module when one exists, else an attribute of pkg
        edges[module] = {t if t in modules else t.rsplit(".", 1)[0]
                         for t in _imports(module, path)} - {module}
        edges[module] &= set(modules)
    return edges


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "nemo_aot"


def test_every_package_is_on_the_map(graph):
    unmapped = sorted({_package(m) for m in graph} - set(BELOW) - {"nemo_aot"})
    assert not unmapped, f"add {unmapped} to BELOW here and to docs/architecture.md"


def test_imports_point_down(graph):
    wrong = []
    for module, targets in graph.items():
        name = _package(module)
        for target in targets:
            other = _package(target)
            if other not in (name, "nemo_aot") and other not in BELOW.get(name, ()):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that run against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: every module is its own."""
    index, low, stack, on_stack, loops = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                loops.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not loops, f"modules that import each other: {loops}"


def test_the_checker_sees_a_loop_and_an_upward_import():
    """The two checks can fail: a planted loop and a models -> data arrow are found."""
    planted = {"nemo_aot.models.a": {"nemo_aot.data.b"}, "nemo_aot.data.b": {"nemo_aot.models.a"}}
    with pytest.raises(AssertionError, match="models.a -> nemo_aot.data.b"):
        test_imports_point_down(planted)
    with pytest.raises(AssertionError, match="import each other"):
        test_no_import_cycles(planted)
