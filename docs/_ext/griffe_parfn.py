"""A griffe extension: parfn's docstrings, as the API reference renders them.

parfn's docstrings are written for ``help()`` and doctest, in reST-flavoured
prose; mkdocstrings renders Markdown. Before a docstring is rendered, this
turns:

* a ``>>>`` example (its lines up to the next blank line) into a ``pycon``
  code block, which Markdown would otherwise read as nested quotes;
* ``:class:`Task```, ``:meth:`Pool.spawn```, ``:func:``, ``:exc:``, ... into
  a cross-reference to that name's entry in the reference when it is a
  public name of ``parfn`` (or a member of one), else into plain ``code``;
* a paragraph ending in ``::`` and the indented block after it into a
  paragraph ending in ``:`` and a code block.

The source stays as it is: ``help(parfn.Pool)`` and the doctests read the
same text. mkdocs.yml names this file in mkdocstrings' ``extensions``;
``tests/test_docs.py`` checks :func:`to_markdown` on its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import griffe

__all__ = ("ParfnDocstrings", "to_markdown")

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|exc|attr|data|mod|obj):`~?([^`]+)`")
_PROMPT = re.compile(r"^(\s*)>>> ?")


def to_markdown(text: str, resolve: Callable[[str], str | None]) -> str:
    """``text`` (a docstring) in Markdown; ``resolve(name)`` gives a cross-reference
    target for a role's name, or None to show the name as code."""

    def role(match: re.Match[str]) -> str:
        name = match.group(1)
        target = resolve(name)
        return f"[`{name}`][{target}]" if target else f"`{name}`"

    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        prompt = _PROMPT.match(line)
        if prompt:  # a doctest example: to the next blank line
            indent = prompt.group(1)
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(f"{indent}```")
            continue
        if line.rstrip().endswith("::") and i + 1 < len(lines) and not lines[i + 1].strip():
            # reST's literal block: "text::", a blank line, an indented block
            head = line.rstrip()[:-2].rstrip()
            block_start = i + 2
            j = block_start
            base = len(line) - len(line.lstrip())
            while j < len(lines) and (
                not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base
            ):
                j += 1
            block = lines[block_start:j]
            while block and not block[-1].strip():
                block.pop()
            if block:
                if head:
                    out.append(_ROLE.sub(role, head) + ":")
                out.append("")
                cut = min(len(b) - len(b.lstrip()) for b in block if b.strip())
                pad = " " * base
                out.append(f"{pad}```python")
                out.extend(pad + b[cut:] if b.strip() else "" for b in block)
                out.append(f"{pad}```")
                out.append("")
                i = j
                continue
        out.append(_ROLE.sub(role, line))
        i += 1
    return "\n".join(out)


class ParfnDocstrings(griffe.Extension):
    """Rewrite every docstring of the ``parfn`` package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "parfn":
            return
        public = _public_paths(pkg)
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = to_markdown(
                    obj.docstring.value, lambda name, o=obj: _resolve(name, o, pkg, public)
                )


def _objects(root: griffe.Object) -> list[griffe.Object]:
    """Every object defined under ``root`` (aliases are visited where they point)."""
    found: list[griffe.Object] = []
    stack: list[griffe.Object] = [root]
    while stack:
        obj = stack.pop()
        found.append(obj)
        stack.extend(m for m in obj.members.values() if not m.is_alias)  # type: ignore[misc]
    return found


def _public_paths(pkg: griffe.Module) -> dict[str, str]:
    """The public path (``parfn.Pool``) of each public name's own path (``parfn._pool.Pool``)."""
    names = pkg.exports or ()
    paths: dict[str, str] = {}
    for name in names:
        member = pkg.members.get(str(name))
        if member is not None:
            paths[member.canonical_path if member.is_alias else member.path] = f"parfn.{name}"
    return paths


def _resolve(
    name: str, obj: griffe.Object, pkg: griffe.Module, public: dict[str, str]
) -> str | None:
    """The reference's anchor for ``name`` as written in ``obj``'s docstring, or None."""
    if name.startswith("parfn."):
        name = name[len("parfn.") :]
    first, _, rest = name.partition(".")
    scopes: list[griffe.Object] = []
    if obj.is_class:
        scopes.append(obj)
    if obj.parent is not None and obj.parent.is_class:
        scopes.append(obj.parent)
    scopes.extend(s for s in (obj.module, pkg) if s is not None)
    for scope in scopes:
        member = scope.members.get(first)
        if member is None:
            continue
        try:
            path = member.canonical_path if member.is_alias else member.path
        except griffe.AliasResolutionError:
            return None
        full = f"{path}.{rest}" if rest else path
        for own, shown in public.items():
            if full == own or full.startswith(own + "."):
                tail = full[len(own) :]
                if any(part.startswith("_") for part in tail.split(".") if part):
                    return None
                return shown + tail
        return None
    return None
