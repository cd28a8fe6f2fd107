"""The tree shows the architecture: imports point one way, and the wire stays at the bottom.

Read from the source (every import statement, those inside functions
included, but not those under ``if TYPE_CHECKING:``), so a circle or an arrow
pointing up fails here, whether or not it would fail at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import parfn

from ._scripts import SCRIPT_METHODS, run_script

ROOT = Path(parfn.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["parfn", *path.relative_to(ROOT).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id.endswith("TYPE_CHECKING")) or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, lazy: bool = True) -> set[str]:
    """The parfn modules that module ``name`` imports; without ``lazy``, only those
    imported as it loads (not those inside a function, imported when it is called)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if not lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("parfn"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("parfn"):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in MODULES else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(name) for name in MODULES}
EAGER = {name: _imports(name, lazy=False) for name in MODULES}


def _ancestors(name: str) -> list[str]:
    """The packages Python imports (runs the ``__init__`` of) before module ``name``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _closure(name: str, loading: bool = False) -> set[str]:
    """The parfn modules ``name`` imports, directly or not; with ``loading``, those
    that loading it runs: its packages' ``__init__`` included, lazy imports not."""
    graph = EAGER if loading else GRAPH
    seen: set[str] = set()
    stack = [name, *(_ancestors(name) if loading else ())]
    while stack:
        for dep in graph[stack.pop()]:
            for module in (dep, *(_ancestors(dep) if loading else ())):
                if module not in seen:
                    seen.add(module)
                    stack.append(module)
    return seen


def test_no_import_circle() -> None:
    circles = sorted(name for name in GRAPH if name in _closure(name))
    assert not circles, f"modules in an import circle: {circles}"


LEAVES = {"parfn._typing"}
"""Modules below everything: they import no parfn module, any module may import them."""


def test_the_leaves_import_no_parfn_module() -> None:
    for name in LEAVES:
        assert not GRAPH[name], f"{name} imports {GRAPH[name]}"


def test_the_wire_imports_nothing_above_it() -> None:
    for name in MODULES:
        if name.startswith("parfn._wire"):
            above = {m for m in GRAPH[name] - LEAVES if not m.startswith("parfn._wire")}
            assert not above, f"{name} imports {above}"


def test_no_module_imports_typing_as_it_loads() -> None:
    """``typing`` costs ~3 ms to import: names come from ``parfn._typing`` (which
    imports it only for type checkers); annotations stay strings (``from
    __future__ import annotations``)."""
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        if name in LEAVES:
            continue
        eager = [
            node
            for node in tree.body
            if isinstance(node, (ast.Import, ast.ImportFrom))
            and (
                getattr(node, "module", None) == "typing"
                or any(a.name == "typing" for a in getattr(node, "names", []))
            )
        ]
        assert not eager, f"{name} imports typing at line {eager[0].lineno}"


def test_a_worker_imports_only_its_loop_and_the_wire() -> None:
    allowed = {
        "parfn",  # the package and what its __init__ loads eagerly: the decorator
        "parfn._decorator",
        "parfn._runtime",
        "parfn._scope",
        "parfn._typing",
        "parfn.backends",
        "parfn.backends._base",
        "parfn.backends.process",
        "parfn.backends.process._channel",
    }
    extra = {
        m
        for m in _closure("parfn.backends.process._worker", loading=True)
        if m not in allowed and not m.startswith("parfn._wire")
    }
    assert not extra, f"the worker loop pulls in {extra}"


def test_the_front_end_does_not_reach_into_an_engine() -> None:
    front = [n for n in MODULES if n.count(".") == 1 and not n.startswith("parfn._wire")]
    for name in front:
        engines = {m for m in GRAPH[name] if m.startswith(("parfn.backends.", "parfn.backends"))}
        reach = {m for m in engines if m not in ("parfn.backends", "parfn.backends._base")}
        assert not reach, f"{name} imports engine modules {reach}"


def test_every_module_says_its_concern() -> None:
    missing = [n for n, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


# -- what a cold start loads ---------------------------------------------------------

FIRST_CALL = """
import sys

import parfn
from parfn import parallel

METHOD = None if sys.argv[1] == "default" else sys.argv[1]


@parallel
def square(x):
    return x * x


def double(x):
    return 2 * x


if __name__ == "__main__":
    print("imported", sorted(m for m in {HEAVY} if m in sys.modules))
    with parfn.Pool(2, start_method=METHOD) as pool:
        print(square.apply(3), pool.apply(double, 4), square.map(range(4)))
    print("apply and map loaded", sorted(m for m in {LIGHT} if m in sys.modules))
    with parfn.Pool(2, start_method=METHOD) as pool:
        print(square.spawn(5).result(timeout=60))
    import multiprocessing

    import parfn.multiprocessing

    context = multiprocessing.get_context(METHOD)  # METHOD None: the default
    with parfn.multiprocessing.Pool(2, context=context) as mp_pool:  # the drop-in
        print(mp_pool.map(double, [1, 2]))
    print("loaded", sorted(m for m in {HEAVY} if m in sys.modules))
"""

HEAVY = ("typing", "inspect", "cloudpickle")
"""Modules a script's first calls need not load (3, 7 and 10 ms to import here)."""
LIGHT = ("logging", "concurrent.futures")
"""Modules that ``apply`` and ``map`` need not load (2 and 0.7 ms), where
``spawn`` does (a Task is a ``concurrent.futures.Future``, whose module loads
``logging``)."""


@pytest.mark.parametrize("method", SCRIPT_METHODS)
def test_a_scripts_first_calls_load_no_typing_inspect_or_cloudpickle_or_logging(
    tmp_path: Path, method: str
) -> None:
    script = FIRST_CALL.replace("{HEAVY}", repr(HEAVY)).replace("{LIGHT}", repr(LIGHT))
    lines = run_script(tmp_path, script, method).stdout.splitlines()
    assert lines[0] == "imported []"
    assert lines[1] == "9 8 [0, 1, 4, 9]"
    if method in ("default", "fork"):
        assert lines[2] == "apply and map loaded []"
    else:  # cloudpickle (see below) imports logging
        assert lines[2] == "apply and map loaded ['logging']"
    assert lines[3] == "25"
    assert lines[4] == "[2, 4]"
    if method in ("default", "fork"):
        # Workers forked after the script defined its functions have them:
        # they are sent by name alone, not by value with cloudpickle.
        assert lines[5] == "loaded []"
    else:
        # Spawned workers import the script anew: its functions also travel
        # by value (cloudpickle, which imports the other two), in case a
        # worker lacks them.
        assert "'cloudpickle'" in lines[5]
