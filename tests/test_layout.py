"""The layout rules (README's Layout section), checked on the source: one-way imports between layers, no import
cycles, modules of at most 350 lines and functions of at most 80.

The import graph comes from an AST walk over every .py file of hpcdnn/ and data_prep/: every `import x` and
`from x import y` anywhere in a module (top level, inside functions and methods), relative imports resolved;
not those under `if TYPE_CHECKING:`, which never run (a type-only back-reference is no cycle). An edge goes to the most specific module named (`from hpcdnn.kernels import update` is an edge to
hpcdnn.kernels.update); only direct imports count (importing hpcdnn.placement, which imports torch, is not
importing torch). Imports by string (importlib, the topology registry) are not seen. No MPI, nothing imported.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hpcdnn", "data_prep")  # the import graph and its cycles
SIZED = ("hpcdnn", "data_prep", "tests", "bench")  # the size limits
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 80
DRIVER = ("hpcdnn.train", "hpcdnn.config", "hpcdnn.evaluate", "hpcdnn.checkpoint", "hpcdnn.metrics", "hpcdnn.cli", "hpcdnn.progress")
RULES = {  # layer -> what no module of it may import directly (a name covers its submodules)
    "hpcdnn.mpi": (*DRIVER, "hpcdnn.data", "hpcdnn.topologies"),
    "hpcdnn.kernels": ("mpi4py", "hpcdnn.mpi", "hpcdnn.models", "hpcdnn.data"),
    "hpcdnn.models": ("mpi4py", "hpcdnn.mpi", "hpcdnn.data"),
    "hpcdnn.data": ("hpcdnn.models", "hpcdnn.mpi", "mpi4py"),
    # a leaf every layer may record into (mpi/ included): stdlib and hpcdnn.atomic only, no torch, no MPI
    "hpcdnn.trace": ("mpi4py", "torch", "numpy", *DRIVER, "hpcdnn.mpi", "hpcdnn.kernels", "hpcdnn.models", "hpcdnn.data",
                     "hpcdnn.topologies", "hpcdnn.placement", "hpcdnn.optim", "hpcdnn.stop", "hpcdnn.plot"),
}  # fmt: skip


def under(name: str, prefix: str) -> bool:
    """True if module `name` is `prefix` or inside it."""
    return name == prefix or name.startswith(prefix + ".")


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root/<package> (a package is named by its __init__)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def runtime_nodes(tree: ast.AST):
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        test = getattr(node, "test", None) if isinstance(node, ast.If) else None
        if test is not None and (getattr(test, "id", None) or getattr(test, "attr", None)) == "TYPE_CHECKING":
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules `name` (at `path`) imports anywhere in its body, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)  # `from pkg import module` vs `from module import thing`
    return out


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the modules it imports directly (ours and third-party), for every module of `packages`."""
    files = module_files(root, packages)
    return {name: imported(name, path, set(files)) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] per strongly connected component of the graph's own modules (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v] & graph.keys()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:  # v is the root of a component: everything above it on the stack
            component = set()
            while v not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [shortest_cycle(graph, min(c), c) for c in components]


def shortest_cycle(graph: dict[str, set[str]], start: str, component: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside `component` (breadth first)."""
    came_from, queue = {}, deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] & component):
            if w == start:  # back at the start: walk the path home
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"{sorted(component)} was reported as a cycle but holds none: a bug in find_cycles")


def forbidden_edges(graph: dict[str, set[str]], rules=RULES) -> list[str]:
    """'a imports b (a layer-name module must not import b)' for every direct import a rule forbids."""
    bad = []
    for module in sorted(graph):
        for layer, banned in rules.items():
            if not under(module, layer):
                continue
            for target in sorted(graph[module]):
                hit = [b for b in banned if under(target, b)]
                if hit:
                    bad.append(f"{module} imports {target} ({layer}.* must not import {hit[0]})")
    return bad


def oversized(root: Path = ROOT, dirs=SIZED) -> list[str]:
    """Every module over MAX_MODULE_LINES lines and every function over MAX_FUNCTION_LINES, with its place."""
    bad = []
    for d in dirs:
        for path in sorted((root / d).rglob("*.py")):
            rel, text = path.relative_to(root), path.read_text()
            lines = len(text.splitlines())
            if lines > MAX_MODULE_LINES:
                bad.append(f"{rel}: {lines} lines (at most {MAX_MODULE_LINES}: split the module)")
            for node in ast.walk(ast.parse(text, str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        bad.append(f"{rel}:{node.lineno} {node.name}(): {n} lines (at most {MAX_FUNCTION_LINES})")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_covers_both_packages(graph):
    assert {"hpcdnn", "hpcdnn.kernels.jit", "hpcdnn.mpi.window", "data_prep.cli"} <= graph.keys()
    assert "hpcdnn.kernels.jit" in graph["hpcdnn.kernels.lrn"] and "hpcdnn.kernels.lrn" in graph["hpcdnn.models.alexnet"]


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (break each by moving the shared piece down a layer):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layers_import_only_downward(graph):
    bad = forbidden_edges(graph)
    assert not bad, "imports against the layers' direction (README, Layout):\n" + "\n".join(bad)


def test_modules_and_functions_are_short():
    bad = oversized()
    assert not bad, "too long (the code rules: modules <= 350 lines, functions <= 80):\n" + "\n".join(bad)


def test_checkers_catch_a_cycle_a_forbidden_edge_and_a_long_function(tmp_path):
    """The checkers themselves, on a synthetic graph and synthetic files: they must fail where the rules are broken."""
    graph = {
        "hpcdnn.kernels.a": {"numpy", "hpcdnn.kernels.b"},
        "hpcdnn.kernels.b": {"hpcdnn.models.m"},  # forbidden, and part of a cycle
        "hpcdnn.models.m": {"hpcdnn.kernels.a", "torch"},
        "hpcdnn.models.self_loop": {"hpcdnn.models.self_loop"},
        "hpcdnn.data.d": {"hpcdnn.placement"},  # allowed: only direct imports count
    }
    assert find_cycles(graph) == [
        ["hpcdnn.kernels.a", "hpcdnn.kernels.b", "hpcdnn.models.m", "hpcdnn.kernels.a"],
        ["hpcdnn.models.self_loop", "hpcdnn.models.self_loop"],
    ]
    assert forbidden_edges(graph) == ["hpcdnn.kernels.b imports hpcdnn.models.m (hpcdnn.kernels.* must not import hpcdnn.models)"]
    assert find_cycles({"x": {"y"}, "y": set()}) == [] and forbidden_edges({"hpcdnn.mpi.w": {"hpcdnn.models.flat"}}) == []
    pkg = tmp_path / "bench"
    pkg.mkdir()
    (pkg / "long.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "\n" * MAX_MODULE_LINES)
    assert oversized(tmp_path, ("bench",)) == [
        f"bench/long.py: {MAX_FUNCTION_LINES + 1 + MAX_MODULE_LINES} lines (at most {MAX_MODULE_LINES}: split the module)",
        f"bench/long.py:1 f(): {MAX_FUNCTION_LINES + 1} lines (at most {MAX_FUNCTION_LINES})",
    ]


def test_graph_sees_function_level_and_relative_imports(tmp_path):
    files = {
        "hpcdnn/__init__.py": "",
        "hpcdnn/kernels/__init__.py": "from . import fast\n",
        "hpcdnn/kernels/fast.py": "def f():\n    from ..mpi import window\n    import mpi4py.MPI\n",
        "hpcdnn/kernels/typed.py": "import typing\nif typing.TYPE_CHECKING:\n    import hpcdnn.mpi\nelse:\n    import numpy\n",
        "hpcdnn/mpi/__init__.py": "",
        "hpcdnn/mpi/window.py": "from .. import kernels\nfrom hpcdnn.kernels.fast import f\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path, ("hpcdnn",))
    assert graph["hpcdnn.kernels"] == {"hpcdnn.kernels.fast"}
    assert graph["hpcdnn.kernels.fast"] == {"hpcdnn.mpi.window", "mpi4py.MPI"}
    assert graph["hpcdnn.kernels.typed"] == {"typing", "numpy"}  # the TYPE_CHECKING import never runs
    assert graph["hpcdnn.mpi.window"] == {"hpcdnn.kernels", "hpcdnn.kernels.fast"}
    assert find_cycles(graph) == [["hpcdnn.kernels", "hpcdnn.kernels.fast", "hpcdnn.mpi.window", "hpcdnn.kernels"]]
    assert forbidden_edges(graph) == [
        "hpcdnn.kernels.fast imports hpcdnn.mpi.window (hpcdnn.kernels.* must not import hpcdnn.mpi)",
        "hpcdnn.kernels.fast imports mpi4py.MPI (hpcdnn.kernels.* must not import mpi4py)",
    ]
