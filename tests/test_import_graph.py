"""The import graph of the ``mailflow`` package has no cycles, and delivery stays below
the front ends: read from the source with ``ast``, nothing is imported.

A cycle is what made ``delivery/transports.py`` import the LMTP and relay transports
lazily behind ``except ImportError`` (they imported ``App``, which imports delivery).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mailflow"

# What delivery may never import, at module level, in a function or under
# TYPE_CHECKING: the application object and everything above delivery.
ABOVE_DELIVERY = (
    "mailflow.app",
    "mailflow.server",
    "mailflow.smtp",  # and mailflow.smtp.*
    "mailflow.milter",
    "mailflow.pipeline",
    "mailflow.check",
    "mailflow.cli",
    "mailflow.transaction",
)


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(
    name: str,
    path: Path,
    known: set[str],
    *,
    everywhere: bool = False,
    functions: bool = False,
) -> Iterator[str]:
    """The ``mailflow`` modules that module ``name`` imports.

    By default only what runs when the module is imported: its top level, including
    ``try``/``if`` blocks and class bodies, but not ``if TYPE_CHECKING:`` blocks nor
    function bodies. With ``functions``, function bodies too (a lazy import is still a
    dependency, only hidden); with ``everywhere``, both. ``from pkg import x`` counts
    as importing ``pkg.x`` when that is a module, else ``pkg``.
    """
    functions = functions or everywhere
    is_package = path.name == "__init__.py"

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    def visit(nodes: list[ast.stmt]) -> Iterator[str]:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "mailflow" and (found := resolve(alias.name)):
                        yield found
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                if base.split(".")[0] != "mailflow":
                    continue
                for alias in node.names:
                    found = resolve(f"{base}.{alias.name}")
                    if found:
                        yield found
            elif isinstance(node, ast.If) and _type_checking(node):
                yield from visit(node.body if everywhere else node.orelse)
                if everywhere:
                    yield from visit(node.orelse)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if functions:
                    yield from visit(node.body)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    block = getattr(node, field, None)
                    if isinstance(block, list):
                        yield from visit([n for n in block if isinstance(n, ast.stmt)])
                if isinstance(node, ast.Try | ast.TryStar):
                    for handler in node.handlers:
                        yield from visit(handler.body)

    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for found in visit(tree.body):
        if found != name:
            yield found


def import_graph(
    root: Path = PACKAGE, *, everywhere: bool = False, functions: bool = False
) -> dict[str, set[str]]:
    found = modules(root)
    known = set(found)
    return {
        name: set(imported(name, path, known, everywhere=everywhere, functions=functions))
        for name, path in found.items()
    }


def by_package(graph: dict[str, set[str]], root: Path = PACKAGE) -> dict[str, set[str]]:
    """The graph with each subpackage of ``mailflow`` (``mailflow.delivery``, ...) as one
    node: delivery importing app while app imports delivery is a cycle here even when
    no single module closes it."""
    top = root.name

    def node(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 else name

    if not all(name.split(".")[0] == top for name in graph):
        raise ValueError("modules of another package")
    out: dict[str, set[str]] = {}
    for name, deps in graph.items():
        out.setdefault(node(name), set()).update(node(d) for d in deps if node(d) != node(name))
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := walk(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


# --- the checks --------------------------------------------------------------------------------


def test_no_import_cycle_between_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_between_subpackages() -> None:
    cycle = find_cycle(by_package(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_through_function_level_imports() -> None:
    """A lazy import inside a function hides a cycle from the interpreter, not from the
    design (the isolation worker building an App did: isolation -> app -> pipeline ->
    isolation). Imports only for type checking do not count: they never run."""
    graph = import_graph(functions=True)
    for checked in (graph, by_package(graph)):
        cycle = find_cycle(checked)
        assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_delivery_never_imports_the_app_or_the_front_ends() -> None:
    graph = import_graph(everywhere=True)
    bad = {
        (name, dep)
        for name, deps in graph.items()
        if name.startswith("mailflow.delivery")
        for dep in deps
        if any(dep == above or dep.startswith(above + ".") for above in ABOVE_DELIVERY)
    }
    assert not bad, f"delivery imports from above it: {sorted(bad)}"


# --- the checker itself, on a made-up package ---------------------------------------------------


def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "mailflow"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        (  # a direct cycle
            {"__init__.py": "", "a.py": "from mailflow import b\n", "b.py": "import mailflow.a\n"},
            ["mailflow.a", "mailflow.b", "mailflow.a"],
        ),
        (  # through a relative import and a name imported from a module
            {
                "__init__.py": "",
                "d/__init__.py": "",
                "d/x.py": "from .y import thing\n",
                "d/y.py": (
                    "try:\n    from mailflow.d.x import other\nexcept ImportError:\n    pass\n"
                ),
            },
            ["mailflow.d.x", "mailflow.d.y", "mailflow.d.x"],
        ),
        (  # TYPE_CHECKING and function bodies do not run at import: no cycle
            {
                "__init__.py": "",
                "a.py": "from mailflow import b\n",
                "b.py": (
                    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from mailflow.a import A\n"
                    "def f():\n    from mailflow.a import A\n"
                ),
            },
            None,
        ),
    ],
)
def test_the_checker_finds_module_cycles(
    tmp_path: Path, files: dict[str, str], cycle: list[str] | None
) -> None:
    assert find_cycle(import_graph(write_package(tmp_path, files))) == cycle


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    root = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from mailflow import b\n",
            "b.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from mailflow.c import C\n"
                "def f():\n    from mailflow.a import A\n"
            ),
            "c.py": "from mailflow import b\n",
        },
    )
    assert find_cycle(import_graph(root)) is None
    assert find_cycle(import_graph(root, functions=True)) == [
        "mailflow.a",
        "mailflow.b",
        "mailflow.a",
    ]


def test_the_checker_finds_a_cycle_between_subpackages_no_module_closes(tmp_path: Path) -> None:
    """The shape this file was written for: a delivery module imports the app, and the
    app imports another delivery module."""
    root = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "app.py": "from mailflow.delivery.spool import Spool\n",
            "delivery/__init__.py": "",
            "delivery/spool.py": "",
            "delivery/lmtp.py": "from mailflow.app import App\n",
        },
    )
    graph = import_graph(root)
    assert find_cycle(graph) is None
    assert find_cycle(by_package(graph, root)) == [
        "mailflow.app",
        "mailflow.delivery",
        "mailflow.app",
    ]
