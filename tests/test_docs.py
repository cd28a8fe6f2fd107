"""The documentation's examples run: README.md's Python blocks and every docstring's.

* Each fenced ``python`` block of README.md runs in a fresh interpreter, as
  code pasted into ``python -c`` would (a REPL or a notebook behaves the same:
  functions defined there travel by value), and must exit 0 with nothing on
  stderr. A block made of ``>>>`` lines runs as a doctest instead, its output
  compared. A block that cannot run here (a fragment, a cluster address) is
  marked in README.md by an HTML comment on the line just above its fence::

      <!-- docs-test: skip (a fragment: needs a Dask scheduler) -->

  or listed in ``README_SKIPS`` below, keyed by a piece of its text.
* Every docstring example in the ``parfn`` modules runs as a doctest.
* Every public name has at least one docstring example that runs.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import parfn

README = Path(__file__).resolve().parent.parent / "README.md"

# README blocks skipped here, each with why: {a piece of the block's text: reason}.
# (Prefer the HTML comment in README.md; an entry here that matches no block fails.)
README_SKIPS: dict[str, str] = {}

# Public names whose docstring has no runnable example yet. Keep it empty: a
# name listed here that gains an example, or one missing here that has none,
# fails test_every_public_name_has_an_example.
LACKING_EXAMPLE: frozenset[str] = frozenset()

_FENCE = re.compile(r"^(\s*)```\s*(\w*)")
_SKIP_COMMENT = re.compile(r"<!--\s*docs-test:\s*skip\s*(.*?)\s*-->")
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


# -- README.md ------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None  # the reason, from an HTML comment above the fence


def readme_blocks(text: str) -> list[Block]:
    """The fenced ``python``/``pycon`` blocks of a Markdown text."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start, language = i, match.group(2).lower()
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].lstrip().startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if language not in ("python", "py", "pycon"):
            continue
        above = next((s for s in reversed(lines[:start]) if s.strip()), "")
        comment = _SKIP_COMMENT.search(above)
        skip = (comment.group(1).strip(" ():") or "marked in README.md") if comment else None
        blocks.append(Block(start + 1, "\n".join(body) + "\n", skip))
    return blocks


def _readme_params() -> list[object]:
    params: list[object] = []
    for block in readme_blocks(README.read_text(encoding="utf-8")):
        reason = block.skip or next((r for k, r in README_SKIPS.items() if k in block.code), None)
        marks = [pytest.mark.skip(reason=f"README.md:{block.line}: {reason}")] if reason else []
        params.append(pytest.param(block, id=f"README.md:{block.line}", marks=marks))
    return params


def test_readme_has_runnable_blocks() -> None:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    runnable = [b for b in blocks if b.skip is None and not any(k in b.code for k in README_SKIPS)]
    assert runnable, "no runnable python block found in README.md"
    for key in README_SKIPS:
        assert any(key in b.code for b in blocks), f"README_SKIPS entry matches no block: {key!r}"


def test_fence_parser_reads_blocks_and_skip_comments() -> None:
    text = (
        "# t\n```bash\nls\n```\n"
        "```python\nx = 1\n```\n"
        "<!-- docs-test: skip (needs a cluster) -->\n\n```python\ny = 2\n```\n"
        "```pycon\n>>> 1 + 1\n2\n```\n"
    )
    blocks = readme_blocks(text)
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (5, "x = 1\n", None),
        (10, "y = 2\n", "needs a cluster"),
        (13, ">>> 1 + 1\n2\n", None),
    ]


@pytest.mark.parametrize("block", _readme_params())
def test_readme_example(block: Block) -> None:
    if block.code.lstrip().startswith(">>>"):
        _run_doctest_text(block.code, f"README.md:{block.line}")
        return
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", block.code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    where = f"README.md:{block.line}"
    assert out.returncode == 0, f"{where} failed:\n{out.stderr}"
    assert out.stderr == "", f"{where} wrote to stderr:\n{out.stderr}"


def _run_doctest_text(text: str, name: str) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {"__name__": "__main__"}, name, name, 0)
    _run(test)


# -- docstrings -------------------------------------------------------------------------


def _modules() -> list[str]:
    names = ["parfn"]
    for info in pkgutil.walk_packages(parfn.__path__, "parfn."):
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
