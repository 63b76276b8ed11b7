"""The package layout the docs promise: `fop` is a library that imports none of the `fop-train` application, and its
modules import each other without a cycle (at module level or inside functions)."""

import ast
import pathlib
import subprocess
import sys

import fop

ROOT = pathlib.Path(fop.__file__).parent


def fop_imports(path: pathlib.Path) -> set[str]:
    """Every fop.* module `path` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in ("fop", "fop_train")}
    return out


def test_import_fop_loads_nothing_of_the_app():
    code = "import sys, fop; print(sorted(m for m in sys.modules if m.startswith('fop_train')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for path in ROOT.glob("*.py"):
        assert not any(m.startswith("fop_train") for m in fop_imports(path)), path.name


def test_no_import_cycle_in_fop():
    graph = {}
    for path in ROOT.glob("*.py"):
        name = "fop" if path.stem == "__init__" else f"fop.{path.stem}"
        graph[name] = {m for m in fop_imports(path) if m != "fop" and m != name}
    assert len(graph) > 10
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
