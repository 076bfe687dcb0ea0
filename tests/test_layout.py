"""The package's shape: no import cycles between its modules (imports inside functions and
``TYPE_CHECKING`` blocks included, since a cycle hidden in a function is still a cycle), and the
public names importable from ``softprompt`` itself."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import softprompt

ROOT = Path(softprompt.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = ("softprompt", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            # "from . import checkpoint" imports the module, not the package's __init__
            if len(submodules) == len(node.names):
                found.update(submodules)
            else:
                found.update(submodules + [target])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {t for t in found if t in known and t != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def package_graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_import_cycles_inside_the_package():
    graph = package_graph()
    found = cycles(graph)
    detail = [" <-> ".join(c) + ": " + "; ".join(
        f"{m} imports {sorted(graph[m] & set(c))}" for m in c) for c in found]  # fmt: skip
    assert not found, "\n".join(detail)


def test_the_cycle_finder_finds_cycles():
    # the check above could pass by finding nothing; here it must find the planted cycles
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]
    known = module_names()
    assert "softprompt.engine.engine" in known and "softprompt.server.app" in known
    # relative imports, inside functions too, are seen
    command = "softprompt.cli.train"  # imports tuning.run inside its functions only
    assert "softprompt.tuning.run" in imports_of(command, known[command], known)


def test_public_names_import_from_the_package():
    for name in softprompt.__all__:
        assert getattr(softprompt, name) is not None, name
    mod = importlib.import_module("softprompt")
    assert set(mod.__all__) >= {"SoftPromptModel", "train", "evaluate", "generate", "Engine"}


def test_public_names_are_never_shadowed_by_submodules():
    # Importing a submodule binds its name on the package; a module named like a public function
    # would then shadow it (``from softprompt import generate`` gave a module). Import them all.
    import pkgutil

    for info in pkgutil.walk_packages(softprompt.__path__, "softprompt."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    shadowed = [n for n in softprompt.__all__ if inspect.ismodule(getattr(softprompt, n))]
    assert not shadowed, f"public names bound to modules: {shadowed}"
    from softprompt import generate

    assert callable(generate) and not inspect.ismodule(generate)


def test_the_python_floor_is_the_one_the_tests_run_on():
    # The server catches asyncio.wait_for's timeout as TimeoutError, which asyncio's timeout is
    # only from Python 3.11; CI runs the suite on 3.11 (docs/testing.md).
    import re
    import sys
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    spec = project["project"]["requires-python"]
    found = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip())
    assert found, spec
    floor = (int(found[1]), int(found[2]))
    assert floor >= (3, 11), spec
    assert sys.version_info[:2] >= floor
    ruff = project["tool"]["ruff"].get("target-version")
    assert ruff in (None, f"py{floor[0]}{floor[1]}"), ruff


def test_no_module_holds_more_than_one_job():
    # Issue 33: a module a newcomer can hold in mind. 600 lines is the ceiling; a module that
    # grows past it is split by job (see docs/architecture.md), not allowed a larger number.
    src = Path(softprompt.__file__).parent
    sizes = {
        p.relative_to(src).as_posix(): len(p.read_text().splitlines()) for p in src.rglob("*.py")
    }
    assert len(sizes) > 40  # the walk found the package
    over = {name: n for name, n in sizes.items() if n > 600}
    assert not over, over
