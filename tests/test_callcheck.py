"""A call whose arguments do not fit its function fails in the caller, with Python's own message.

The expected outcome of every case is Python's: the function itself is
called here with the same arguments, and the check must raise the same
TypeError (same message) exactly when that call does.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from parfn._callcheck import check_call


def plain(x: Any) -> Any:
    return x


def defaults(a: Any, b: Any = 1, *, c: Any, d: Any = 2) -> Any:
    return a


def everything(a: Any, /, b: Any, c: Any = 3, *rest: Any, k: Any, kk: Any = 4, **extra: Any) -> Any:
    return a


def positional_only(a: Any, b: Any = 2, /) -> Any:
    return a


def keyword_only(*, k: Any) -> Any:
    return k


class Thing:
    def method(self, a: Any, b: Any = 2) -> Any:
        return a

    @classmethod
    def klass(cls, a: Any) -> Any:
        return a

    @staticmethod
    def static(a: Any) -> Any:
        return a

    def __call__(self, a: Any) -> Any:
        return a


class Wrapper:
    """A class-based decorator that supplies the first argument itself."""

    def __init__(self, fn: Any) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn("supplied", *args)


@Wrapper
def handler(context: Any, x: Any) -> Any:
    return x


def _closure() -> Any:
    y = 1

    def inner(x: Any, *, z: Any = y) -> Any:
        return x

    return inner


FUNCTIONS = {
    "plain": plain,
    "defaults": defaults,
    "everything": everything,
    "positional_only": positional_only,
    "keyword_only": keyword_only,
    "method": Thing().method,
    "classmethod": Thing.klass,
    "staticmethod": Thing.static,
    "callable object": Thing(),
    "class-based decorator": handler,
    "lambda": lambda x, y=2: x,
    "closure": _closure(),
    "partial": functools.partial(defaults, 1),
}

CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((), {}),
    ((1,), {}),
    ((1, 2), {}),
    ((1, 2, 3, 4), {}),
    ((1,), {"c": 3}),
    ((1,), {"k": 1}),
    ((1, 2), {"k": 1, "z": 0}),
    ((), {"a": 1, "b": 2, "k": 3}),
    ((1,), {"a": 1}),
    ((), {"x": 1}),
    ((1,), {"b": 2, "c": 3}),
]


def _python_says(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    try:
        fn(*args, **kwargs)
    except TypeError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name", FUNCTIONS)
def test_the_check_raises_what_the_call_would(name: str) -> None:
    fn = FUNCTIONS[name]
    for args, kwargs in CALLS:
        expected = _python_says(fn, args, kwargs)
        try:
            check_call(fn, args, kwargs)
            got = None
        except TypeError as exc:
            got = str(exc)
        if isinstance(fn, functools.partial):  # C: left to the worker to raise
            assert got is None
        elif name == "class-based decorator":
            # Its __call__ takes any positional arguments: what its body
            # raises is the worker's to report (not its __wrapped__
            # function's signature); a keyword fails __call__'s own binding.
            assert got == (expected if kwargs else None), (args, kwargs)
        else:
            assert got == expected, (name, args, kwargs)


def test_a_shape_that_fitted_is_not_checked_again() -> None:
    calls = []

    def spy(x: Any) -> Any:
        return x

    check_call(spy, (1,), {})
    from parfn import _callcheck

    checker, shapes = _callcheck._checkers[spy]
    assert shapes == {1}
    assert checker is not None
    _callcheck._checkers[spy] = (lambda *a, **k: calls.append(a), shapes)
    check_call(spy, (2,), {})  # same shape: the remembered verdict
    check_call(spy, (2, 3), {})  # a new shape: checked
    assert calls == [(2, 3)]
