"""The documentation's examples run: the pages' code blocks and every docstring's.

The pages are README.md and every Markdown file under docs/ (the site), except
those in ``NOT_RUN``. A fenced block of a page runs the way a reader who copies
it would run it:

* a ``python`` block is saved as a file and run as ``python -W error
  example.py`` in a fresh directory, so its functions live in ``__main__``, as
  in the reader's own script (under the ``spawn`` and ``forkserver`` start
  methods the workers import that file). It must exit 0 with nothing on
  stderr. When a ``text`` block follows it with only blank lines between, that
  is its output: stdout must match it (``...`` stands for any text, as in a
  doctest, and runs of whitespace compare equal);
* a ``pycon`` block (``>>>`` lines) is a REPL session: it runs as a doctest in
  a fresh interpreter, where functions defined at the prompt live in a
  ``__main__`` that has no file, as in a REPL or a notebook; each output is
  compared.

HTML comments on the lines just above a block's fence say how to run it::

    <!-- docs-test: skip (a fragment: needs a Dask scheduler) -->
    <!-- docs-test: requires numpy distributed -->   (skipped where not installed)
    <!-- docs-test: writes to stderr (a progress bar) -->

and between a ``python`` block and a ``text`` block,
``<!-- docs-test: output not compared (why) -->`` says that the text shows one
run's output that varies (times, pids). An unknown ``docs-test:`` comment fails.

Besides: every docstring example in the ``parfn`` modules runs as a doctest;
every public name has at least one docstring example that runs; the API
reference (docs/reference.md) renders every name of ``parfn.__all__``; the
README's links lead to files that exist.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import io
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import parfn

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

NOT_RUN: dict[str, str] = {
    "docs/contract.md": "the specification, kept word for word: its blocks are fragments "
    "that name functions defined in other blocks",
}
"""Pages whose blocks are not run, each with why."""

# Public names whose docstring has no runnable example yet. Keep it empty: a
# name listed here that gains an example, or one missing here that has none,
# fails test_every_public_name_has_an_example.
LACKING_EXAMPLE: frozenset[str] = frozenset()

_FENCE = re.compile(r"^(\s*)```\s*(\w*)")
_DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
_TIMEOUT = 120  # seconds one block may take (the tutorial's take about 5 s)


# -- the pages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    language: str = "python"  # "python" or "pycon"
    skip: str | None = None  # the reason, from a comment above the fence
    requires: tuple[str, ...] = ()  # modules it needs: skipped where one is missing
    stderr_ok: bool = False
    expected: str | None = None  # the output block that follows it, to compare


@dataclass
class _Fence:
    line: int
    language: str
    body: list[str]
    above: list[str]  # the directives on the lines just above the fence
    between: list[str]  # the lines between the previous fence's end and this one


def _fences(text: str) -> list[_Fence]:
    fences: list[_Fence] = []
    lines = text.splitlines()
    i = 0
    last_end = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start, language = i, match.group(2).lower()
        above: list[str] = []
        for s in reversed(lines[last_end:start]):
            if not s.strip():
                continue
            directive = _DIRECTIVE.search(s)
            if directive is None:
                break
            above.insert(0, directive.group(1))
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].lstrip().startswith("```"):
            body.append(lines[i])
            i += 1
        fences.append(_Fence(start + 1, language, body, above, lines[last_end:start]))
        i += 1  # the closing fence
        last_end = i
    return fences


def page_blocks(text: str) -> list[Block]:
    """The ``python`` and ``pycon`` blocks of a Markdown text, with how to run each."""
    fences = _fences(text)
    blocks: list[Block] = []
    for n, fence in enumerate(fences):
        language = {"python": "python", "py": "python", "pycon": "pycon"}.get(fence.language)
        if language is None:
            continue
        skip: str | None = None
        requires: tuple[str, ...] = ()
        stderr_ok = False
        for directive in fence.above:
            word, _, rest = directive.partition(" ")
            if word == "skip":
                skip = rest.strip(" ():") or "marked in the page"
            elif word == "requires" and rest.split():
                requires += tuple(rest.split())
            elif directive.startswith("writes to stderr"):
                stderr_ok = True
            elif not directive.startswith("output not compared"):
                raise ValueError(f"line {fence.line}: unknown docs-test comment {directive!r}")
        code = "\n".join(fence.body) + "\n"
        if language == "python" and code.lstrip().startswith(">>>"):
            language = "pycon"
        expected = None
        after = fences[n + 1] if n + 1 < len(fences) else None
        if (
            language == "python"
            and after is not None
            and after.language == "text"
            and not any(s.strip() for s in after.between)
        ):
            expected = "\n".join(after.body) + "\n"
        blocks.append(Block(fence.line, code, language, skip, requires, stderr_ok, expected))
    return blocks


def pages() -> list[Path]:
    """README.md and the site's pages."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _page_params() -> list[object]:
    params: list[object] = []
    for page in pages():
        name = _name(page)
        if name in NOT_RUN:
            continue
        for block in page_blocks(page.read_text(encoding="utf-8")):
            where = f"{name}:{block.line}"
            marks = [pytest.mark.skip(reason=f"{where}: {block.skip}")] if block.skip else []
            params.append(pytest.param(block, id=where, marks=marks))
    return params


def test_fence_parser_reads_blocks_directives_and_outputs() -> None:
    text = (
        "# t\n```bash\nls\n```\n"
        "```python\nx = 1\n```\n"
        "<!-- docs-test: skip (needs a cluster) -->\n\n```python\ny = 2\n```\n"
        "```pycon\n>>> 1 + 1\n2\n```\n"
        "<!-- docs-test: requires numpy tqdm -->\n"
        "<!-- docs-test: writes to stderr (a bar) -->\n"
        "```python\nprint(3)\n```\n\n```text\n3\n```\n"
        "```python\nprint(4)\n```\n"
        "<!-- docs-test: output not compared (it varies) -->\n"
        "```text\n4\n```\n"
        "```python\nprint(5)\n```\nprose\n```text\n5\n```\n"
    )
    blocks = page_blocks(text)
    assert [(b.line, b.code, b.language, b.skip) for b in blocks] == [
        (5, "x = 1\n", "python", None),
        (10, "y = 2\n", "python", "needs a cluster"),
        (13, ">>> 1 + 1\n2\n", "pycon", None),
        (19, "print(3)\n", "python", None),
        (26, "print(4)\n", "python", None),
        (33, "print(5)\n", "python", None),
    ]
    assert blocks[3].requires == ("numpy", "tqdm")
    assert blocks[3].stderr_ok and not blocks[4].stderr_ok
    assert [b.expected for b in blocks[3:]] == ["3\n", None, None]
    with pytest.raises(ValueError, match="unknown docs-test comment"):
        page_blocks("<!-- docs-test: skp -->\n```python\nx = 1\n```\n")


def test_readme_has_runnable_blocks() -> None:
    blocks = page_blocks(README.read_text(encoding="utf-8"))
    assert [b for b in blocks if b.skip is None], "no runnable python block found in README.md"


def test_not_run_names_existing_pages() -> None:
    names = {_name(p) for p in pages()}
    assert set(NOT_RUN) <= names, f"NOT_RUN names pages that do not exist: {set(NOT_RUN) - names}"


@pytest.mark.timeout(_TIMEOUT + 30)
@pytest.mark.parametrize("block", _page_params())
def test_page_example(block: Block, tmp_path: Path) -> None:
    for module in block.requires:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}, not installed here")
    if block.language == "pycon":
        out = _run_child(["-c", _PYCON_RUNNER], tmp_path, stdin=block.code)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stderr == "", f"wrote to stderr:\n{out.stderr}"
        return
    (tmp_path / "example.py").write_text(block.code, encoding="utf-8")
    out = _run_child(["example.py"], tmp_path)
    assert out.returncode == 0, f"failed:\n{out.stderr}"
    if not block.stderr_ok:
        assert out.stderr == "", f"wrote to stderr:\n{out.stderr}"
    if block.expected is not None:
        checker = doctest.OutputChecker()
        if not checker.check_output(block.expected, out.stdout, _FLAGS):
            example = doctest.Example("example.py", block.expected)
            pytest.fail(checker.output_difference(example, out.stdout, _FLAGS))


def _run_child(
    args: list[str], cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # parfn as installed
    return subprocess.run(
        [sys.executable, "-W", "error", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        cwd=cwd,
        env=env,
        check=False,
    )


_PYCON_RUNNER = """
import doctest, sys
text = sys.stdin.read()
test = doctest.DocTestParser().get_doctest(text, {"__name__": "__main__"}, "pycon", "pycon", 0)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
runner.run(test, out=sys.stdout.write)
sys.exit(1 if runner.failures else 0)
"""


def test_readme_links_lead_to_files() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert local, "README.md links to no page"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_how_it_works_shows_the_engines_own_diagrams() -> None:
    """docs/how-it-works.md carries the process engine's diagrams as its docstring has them."""
    import parfn.backends.process as engine

    page = (DOCS / "how-it-works.md").read_text(encoding="utf-8")
    doc = engine.__doc__ or ""
    blocks = re.findall(r"::\n\n((?:    .*\n|\n)+)", doc + "\n")
    assert len(blocks) >= 2, "the engine's docstring lost its diagrams"
    for block in blocks:
        text = textwrap.dedent(block).strip("\n")
        assert text in page, (
            "docs/how-it-works.md is out of date: copy this block of "
            f"src/parfn/backends/process/__init__.py into it:\n{text}"
        )


# -- the API reference ----------------------------------------------------------------


def test_reference_renders_every_public_name() -> None:
    """docs/reference.md has a ``::: parfn.NAME`` line for each name of ``__all__``.

    (``mkdocs build --strict``, in .ci/run, fails on a line whose name cannot be
    found.)
    """
    text = (DOCS / "reference.md").read_text(encoding="utf-8")
    rendered = re.findall(r"^:::\s+parfn\.(\w+)\s*$", text, re.MULTILINE)
    missing = sorted(set(parfn.__all__) - set(rendered))
    assert not missing, f"add to docs/reference.md: {[f'::: parfn.{n}' for n in missing]}"
    unknown = sorted(set(rendered) - set(parfn.__all__))
    assert not unknown, f"docs/reference.md renders names not in parfn.__all__: {unknown}"
    assert len(rendered) == len(set(rendered)), "docs/reference.md renders a name twice"


def test_reference_docstrings_become_markdown() -> None:
    """The griffe extension of the reference (docs/_ext): doctests, roles, literal blocks."""
    pytest.importorskip("griffe", reason="the docs extra: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("griffe_parfn", DOCS / "_ext" / "griffe_parfn.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (
        "Run it, see :class:`Task` and :meth:`~parfn.Pool.spawn`, not :exc:`KeyError`.\n"
        "\n"
        ">>> 1 + 1\n"
        "2\n"
        "\n"
        "Kept::\n"
        "\n"
        "    except E as e:\n"
        "        print(e)\n"
        "\n"
        "The end."
    )
    known = {"Task": "parfn.Task", "parfn.Pool.spawn": "parfn.Pool.spawn"}
    assert module.to_markdown(text, known.get).splitlines() == [
        "Run it, see [`Task`][parfn.Task] and [`parfn.Pool.spawn`][parfn.Pool.spawn], "
        "not `KeyError`.",
        "",
        "```pycon",
        ">>> 1 + 1",
        "2",
        "```",
        "",
        "Kept:",
        "",
        "```python",
        "except E as e:",
        "    print(e)",
        "```",
        "",
        "The end.",
    ]


# -- docstrings -------------------------------------------------------------------------


OPTIONAL = {"parfn.joblib": "joblib"}
"""Modules that need an extra, and the package each needs: left out where it is missing."""


def _modules() -> list[str]:
    names = ["parfn"]
    for info in pkgutil.walk_packages(parfn.__path__, "parfn."):
        needs = OPTIONAL.get(info.name)
        if needs is None or importlib.util.find_spec(needs) is not None:
            names.append(info.name)
    return sorted(names)


def _runs(example: doctest.Example) -> bool:
    """False for an example marked ``# doctest: +SKIP``."""
    return not example.options.get(doctest.SKIP, False)


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests: list[doctest.DocTest] = []
    for name in _modules():
        found = finder.find(importlib.import_module(name), name)
        tests.extend(t for t in found if any(_runs(e) for e in t.examples))
    return sorted(tests, key=lambda t: t.name)


def _run(test: doctest.DocTest) -> None:
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=_FLAGS)
    try:
        result = runner.run(test, out=out.write, clear_globs=True)
    finally:
        parfn.shutdown()
    assert result.failed == 0, out.getvalue()


@pytest.mark.parametrize("test", _doctests(), ids=lambda t: t.name)
def test_docstring_examples(test: doctest.DocTest) -> None:
    _run(test)


def _has_runnable_example(obj: object) -> bool:
    examples = doctest.DocTestParser().get_examples(getattr(obj, "__doc__", None) or "")
    return any(_runs(e) for e in examples)


def test_every_public_name_has_an_example() -> None:
    lacking = {n for n in parfn.__all__ if not _has_runnable_example(getattr(parfn, n))}
    assert lacking <= LACKING_EXAMPLE, f"give these a docstring example: {sorted(lacking)}"
    gained = LACKING_EXAMPLE - lacking
    assert not gained, f"these have an example now: remove them from LACKING_EXAMPLE: {gained}"
