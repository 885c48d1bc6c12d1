"""The package's import graph, read with `ast` (imports inside functions
included): no cycle between modules, and no module reaches into another
module's underscore names."""

import ast
import pathlib

import pytest

import torchbragg

PACKAGE = pathlib.Path(torchbragg.__file__).parent
NAME = "torchbragg"


def _modules() -> dict:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = (NAME,) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _absolute(module: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _graph():
    """(edges module -> modules it imports, [(module, what it takes that is private)])."""
    edges, private = {m: set() for m in MODULES}, []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        bound = {}  # local name -> package module it refers to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _absolute(module, path, node)
                if not target.startswith(NAME):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in MODULES:
                        edges[module].add(sub)
                        bound[alias.asname or alias.name] = sub
                        if _private(alias.name) and not module.startswith(target + "."):
                            private.append((module, sub))  # a private module of another package
                    elif target in MODULES:
                        edges[module].add(target)
                        if _private(alias.name) and target != module:
                            private.append((module, f"{target}.{alias.name}"))
                        parent, _, last = target.rpartition(".")
                        if _private(last) and not module.startswith(parent + "."):
                            private.append((module, target))  # names of a private module of another package
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES:
                        edges[module].add(alias.name)
                        if alias.asname:
                            bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and bound[node.value.id] != module):
                private.append((module, f"{bound[node.value.id]}.{node.attr}"))
        edges[module].discard(module)
    return edges, private


def _cycles(edges) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_package():
    edges, _ = _graph()
    assert len(MODULES) > 40
    assert "torchbragg.build.nanobragg" in edges["torchbragg.simulator"]  # Simulator.from_args
    assert "torchbragg.simulator" in edges["torchbragg.build.experiment"]
    assert "torchbragg.resolve" in edges["torchbragg.validate"]


def test_no_import_cycles():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_no_module_takes_another_modules_private_names():
    _, private = _graph()
    assert private == []


@pytest.mark.parametrize("source,expect_cycle,expect_private", [
    ({"a": "from . import b\n", "b": "def f():\n    from .a import g\n"}, True, False),
    ({"a": "from .b import _hidden\n", "b": "x = 1\n"}, False, True),
    ({"a": "from . import b\n\ndef f():\n    return b._inner\n", "b": "x = 1\n"}, False, True),
    ({"a": "from . import b\n", "b": "import os\n"}, False, False),
    ({"a": "from .sub._base import M\n", "sub/__init__": "", "sub/_base": "M = 1\n"}, False, True),
])
def test_the_checks_catch_what_they_look_for(source, expect_cycle, expect_private, tmp_path, monkeypatch):
    """The same analysis on a small made-up package, so the two tests above
    can fail: a cycle through a function-level import, a private name, a
    private attribute of an imported module."""
    root = tmp_path / NAME
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, text in source.items():
        (root / f"{name}.py").parent.mkdir(exist_ok=True)
        (root / f"{name}.py").write_text(text)
    monkeypatch.setattr(f"{__name__}.PACKAGE", root)
    monkeypatch.setattr(f"{__name__}.MODULES", _modules())
    edges, private = _graph()
    assert bool(_cycles(edges)) == expect_cycle
    assert bool(private) == expect_private
