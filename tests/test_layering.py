"""The house's layering, read from the source with ``ast``: no import cycle (function-level imports
included), no arrow up a tier, no function longer than a screen.

Tiers, top to bottom: the app (``app.py`` and ``ui/``) → ``jobs`` → ``storage`` → ``qalora``. Inside
the library the sub-packages are ordered too (docs/architecture.md draws it): the command line on
top, then training (the loop and the fine-tune recipe), evaluation, deployment (exports, runtimes,
the server), data, models (finding, streaming and quantizing a base), the method (quantization,
the QA-LoRA layer, the merge, kernels), and the few modules every tier shares (config, errors,
memory, compile switch). A module may import its own sub-package and anything below it.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qalora", "storage", "jobs", "ui")
# lowest first; a module's tier is the longest prefix of its name found here
TIERS = ("qalora", "qalora.method", "qalora.models", "qalora.data", "qalora.deployment", "qalora.evaluation",
         "qalora.training", "qalora.cli", "qalora.__main__", "storage", "jobs", "ui", "app")
LONGEST_FUNCTION = 60  # lines, outside tests/ and bench/


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project by its dotted name (Alembic's migration scripts aside: Alembic
    loads them by path)."""
    files = {"app": root / "app.py"}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def imports(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the project's modules it imports, wherever the import statement stands."""
    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                for alias in node.names:  # `from pkg import module` imports the module itself
                    child = f"{base}.{alias.name}"
                    found.add(child if child in files else known(base))
        found.discard(None)
        found.discard(name)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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


def tier(module: str) -> int:
    best = max((t for t in TIERS if module == t or module.startswith(t + ".")), key=len)
    return TIERS.index(best)


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} → {d}" for m, deps in graph.items() for d in deps if tier(d) > tier(m))


def long_functions(root: Path = ROOT, limit: int = LONGEST_FUNCTION) -> list[str]:
    out = []
    for path in [root / "app.py", root / "charts.py", *(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))]:
        if not path.exists() or "migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_the_project_has_no_import_cycle():
    found = cycles(imports(module_files()))
    assert not found, "import cycles (function-level imports included): " + "; ".join(" ↔ ".join(c) for c in found)


def test_no_module_imports_a_tier_above_its_own():
    assert not upward(imports(module_files()))


def test_the_checks_see_what_they_guard(tmp_path):
    """The graph reader finds relative, absolute and function-level imports, and both checks fire."""
    (tmp_path / "qalora" / "method").mkdir(parents=True)
    (tmp_path / "app.py").write_text("")
    (tmp_path / "qalora" / "__init__.py").write_text("")
    (tmp_path / "qalora" / "method" / "__init__.py").write_text("")
    (tmp_path / "qalora" / "method" / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "qalora" / "method" / "b.py").write_text("from qalora.method.a import f\nimport qalora.cli\n")
    (tmp_path / "qalora" / "cli.py").write_text("from .method import a\n" + "x = 1\n" * 3)
    graph = imports(module_files(tmp_path))
    assert graph["qalora.method.a"] == {"qalora.method.b"} and graph["qalora.cli"] == {"qalora.method.a"}
    assert graph["qalora.method.b"] == {"qalora.method.a", "qalora.cli"}
    assert cycles(graph) == [["qalora.cli", "qalora.method.a", "qalora.method.b"]]
    assert upward(graph) == ["qalora.method.b → qalora.cli"]
    (tmp_path / "qalora" / "cli.py").write_text("def g():\n" + "    x = 1\n" * 61)
    assert long_functions(tmp_path) == ["qalora/cli.py:1 g (62 lines)"]


def test_no_function_is_longer_than_a_screen():
    """Outside tests and benchmarks, a function reads on one screen: a longer one is a list of
    named steps waiting to be written as such."""
    assert not long_functions()
