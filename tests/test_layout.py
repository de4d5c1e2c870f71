"""The layout is the architecture (docs/architecture.md): every module imports, no two modules import
each other (directly or round a loop), the core never imports the toy world, and the library's
subpackages depend on each other in one direction only.

The graph is read from the source (every import statement, lazy ones inside functions and
`TYPE_CHECKING` ones included), so a loop that only a type checker or one code path would follow
counts too.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("blocklora", "federation", "serve", "devtools", "benchmarks")
# The library's rooms, bottom to top: a module may import its own room and the rooms below it.
# The toy world is on top: it uses the core, and nothing in the core uses it.
LAYERS = ("config", "files", "pipeline", "method", "training", "cli", "toy")
# Which packages each package may import (the library ships to Ray workers without the rest).
ALLOWED = {
    "blocklora": {"blocklora"},
    "federation": {"blocklora", "federation"},
    "serve": {"blocklora", "federation", "serve"},
    "devtools": {"blocklora", "federation", "devtools"},
    "benchmarks": set(PACKAGES),
}


def module_files() -> dict[str, Path]:
    """Module name -> file, for every module of PACKAGES (a package's __init__ under its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_files()


def imports_of(path: Path) -> set[str]:
    """The first-party modules `path` imports anywhere in its body (`from a import b` counts as a.b
    when b is a module, else as a)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & MODULES.keys()
            out |= subs or {node.module}
    return {name for name in out if name.split(".")[0] in PACKAGES}


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def room(module: str) -> str:
    """blocklora.method.merge -> 'method'; blocklora.config -> 'config'; blocklora/__init__, __main__ -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else ""


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as [a, b, ..., a], or None (depth-first search with an explicit stack)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, todo = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt) and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_finds_a_loop_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_loops():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_every_import_names_a_module_that_exists():
    missing = {f"{name} imports {dep}" for name, deps in GRAPH.items() for dep in deps if dep not in MODULES}
    assert not missing, sorted(missing)


def test_packages_import_only_what_they_sit_on():
    wrong = [f"{name} -> {dep}" for name, deps in GRAPH.items() for dep in deps
             if dep.split(".")[0] not in ALLOWED[name.split(".")[0]]]
    assert not wrong, wrong


def test_library_rooms_depend_downward_and_the_core_never_imports_the_toy_world():
    wrong = [f"{name} -> {dep}" for name, deps in GRAPH.items() if name.startswith("blocklora.") and room(name)
             for dep in deps if room(dep) and LAYERS.index(room(dep)) > LAYERS.index(room(name))]
    assert not wrong, wrong
    core = [name for name in GRAPH if name.startswith("blocklora") and room(name) != "toy"]
    assert not [f"{name} -> {dep}" for name in core for dep in GRAPH[name] if room(dep) == "toy"]


def test_subpackages_import_nothing_on_import():
    """Importing blocklora.training.data must not load the trainer (nor diffusers): a client job's driver
    reads its pictures with it. So a package's __init__ holds a docstring (and blocklora's lazy names)."""
    heavy = [name for name, path in MODULES.items() if path.name == "__init__.py" and GRAPH[name]]
    assert not heavy, heavy


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.endswith("__main__")))
def test_module_imports(name: str):
    importlib.import_module(name)


def test_lazy_exports_resolve():
    import blocklora

    for name in blocklora.__all__:
        assert getattr(blocklora, name).__name__ == name
