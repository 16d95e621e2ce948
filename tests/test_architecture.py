"""The package's layering (docs/ARCHITECTURE.md), checked from the source: every module imports on its own, the
imports between deltapack's modules (at module level or inside functions) form no cycle, no module uses another
module's private name, and the product never imports the research code or the CLI."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import deltapack

PACKAGE = Path(deltapack.__file__).parent


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("deltapack",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_names()
EXTENSIONS = {"deltapack._core"}  # the C++ core: a module, not a name from deltapack/__init__.py


def imports_of(name: str, path: Path):
    """(imported module, names taken from it, line) for every import of a deltapack module in the file; relative
    imports resolved. `from pkg import sub` counts as an import of the submodule when sub is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "deltapack":
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "deltapack":
                continue
            plain = []
            for a in node.names:
                if f"{target}.{a.name}" in MODULES or f"{target}.{a.name}" in EXTENSIONS:
                    yield f"{target}.{a.name}", [], node.lineno
                else:
                    plain.append(a.name)
            if plain:
                yield target, plain, node.lineno


def test_the_walk_sees_the_layers():
    """A check of the checker: the tree has the packages ARCHITECTURE.md describes."""
    for package in ("deltapack.compress", "deltapack.export", "deltapack.research", "deltapack.cli"):
        assert package in MODULES
    edges = {(n, t) for n, p in MODULES.items() for t, _, _ in imports_of(n, p)}
    assert ("deltapack.compress.budget", "deltapack.compress.allocate") in edges
    assert ("deltapack.research.pairs", "deltapack.lm") in edges


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_imports_alone(name):
    if name.endswith("__main__"):
        pytest.skip("a __main__ module runs a command when imported")
    r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_no_import_cycle():
    graph = {n: sorted({t for t, _, _ in imports_of(n, p) if t in MODULES and t != n}) for n, p in MODULES.items()}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n)


def test_no_private_name_crosses_a_module():
    found = []
    for name, path in MODULES.items():
        for target, names, line in imports_of(name, path):
            found += [f"{path.name}:{line} takes {target}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__") and n != "_core"]
        # attribute access through an imported module: `checkpoint._Rebuilder`
        modules = {a.asname or a.name for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom) and node.module != "__future__" for a in node.names
                   if (node.level or (node.module or "").startswith("deltapack"))}
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def test_the_product_never_imports_research_or_the_cli():
    found = []
    for name, path in MODULES.items():
        if name.startswith(("deltapack.research", "deltapack.cli")) or name == "deltapack.__main__":
            continue
        for target, _, line in imports_of(name, path):
            if target.startswith(("deltapack.research", "deltapack.cli")):
                found.append(f"{name}:{line} imports {target}")
    for name, path in MODULES.items():
        if name.startswith("deltapack.research"):
            found += [f"{name}:{line} imports {t}" for t, _, line in imports_of(name, path)
                      if t.startswith("deltapack.cli")]
    assert not found, "\n".join(found)
