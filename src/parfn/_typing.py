"""Typing at no import cost: the names from ``typing`` that parfn's modules use.

Type checkers read this module with ``TYPE_CHECKING`` true (mypy and pyright
take any name ``TYPE_CHECKING`` so), and so see ``typing``'s own names. At
run time ``import typing`` is not needed and would cost ~3 ms, a twentieth
of a cold start (a program that imports parfn and runs one call): every
module of parfn has ``from __future__ import annotations``, so annotations
stay strings, and the few names used in code get stand-ins here that do what
that code needs of them:

* ``Generic[T]``, ``Protocol``: base classes whose subclasses can be
  subscripted (``Parallel[[int], str]``, as ``list[int]``);
* ``NamedTuple``: class syntax for ``collections.namedtuple``, with the
  class's docstring, methods and defaults;
* ``TypeVar``, ``ParamSpec``, ``overload``, ``cast``, ``Any``, ``Literal``:
  what they are worth once annotations are not evaluated.

The test suite checks that ``import parfn`` and a first call import no
``typing`` (``tests/test_layout.py``).

What a user's annotations do with parfn's types works as with ``typing``'s:
``Optional[parfn.Parallel[[int], int]]``, ``parfn.Task[int]``,
``typing.get_type_hints`` of the user's own functions. What does not: runtime
introspection of parfn's *own* annotations (``typing.get_type_hints(parfn.Pool.map)``
meets a stand-in ``ParamSpec`` where ``typing`` wants its own).
"""

from __future__ import annotations

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any as Any
    from typing import Generic as Generic
    from typing import Literal as Literal
    from typing import NamedTuple as NamedTuple
    from typing import ParamSpec as ParamSpec
    from typing import Protocol as Protocol
    from typing import TextIO as TextIO
    from typing import TypeVar as TypeVar
    from typing import cast as cast
    from typing import overload as overload
else:
    import collections
    import types

    Any = object
    TextIO = object

    class _Special:
        """``Literal[...]``: subscripting gives itself back."""

        def __init__(self, name):
            self._name = name

        def __getitem__(self, _params):
            return self

        def __repr__(self):
            return f"parfn._typing.{self._name}"

    Literal = _Special("Literal")

    class _Var:
        """A type variable: only its name."""

        def __init__(self, name, *_constraints, **_options):
            self.__name__ = name

        def __repr__(self):
            return f"~{self.__name__}"

    TypeVar = ParamSpec = _Var

    class Generic:
        """A base whose subclasses are subscriptable, as ``list`` is."""

        __slots__ = ()

        def __class_getitem__(cls, params):
            # A ParamSpec's argument list becomes a tuple, as typing makes it:
            # the alias stays hashable (``Optional[Parallel[[int], int]]``).
            params = params if type(params) is tuple else (params,)
            return types.GenericAlias(
                cls, tuple(tuple(p) if type(p) is list else p for p in params)
            )

    class Protocol(Generic):
        """A base for interfaces: type checkers check them, the run time does not."""

        __slots__ = ()

    def overload(func):
        return func

    def cast(_type, value):
        return value

    _NOT_COPIED = ("__module__", "__classcell__")

    class _NamedTupleMeta(type):
        def __new__(mcls, name, bases, namespace):
            if namespace.get("__module__") == __name__:  # NamedTuple itself
                return super().__new__(mcls, name, bases, namespace)
            fields = list(namespace.get("__annotations__", {}))
            defaults = [namespace[f] for f in fields if f in namespace]
            cls = collections.namedtuple(
                name, fields, defaults=defaults, module=namespace["__module__"]
            )
            for key, value in namespace.items():
                if key not in fields and key not in _NOT_COPIED:
                    setattr(cls, key, value)
            return cls

    class NamedTuple(metaclass=_NamedTupleMeta):
        """``class Point(NamedTuple): x: int; y: int = 0`` makes a ``collections.namedtuple``."""
