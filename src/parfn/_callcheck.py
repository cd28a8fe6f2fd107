"""Checking a call's arguments in the caller, before it is sent to a worker.

A call whose arguments do not fit the function raises its TypeError at once,
in the caller, rather than on a worker. A call's shape (how many positional
arguments, which keywords) that fitted once is remembered, so a function's
later calls skip the check.

A function written in Python (a plain function, a bound method, an object
whose class defines ``__call__`` in Python) is checked by Python itself: by
calling a stub made with the same parameters and an empty body, which raises
the very TypeError the call would ("square() takes 1 positional argument but
2 were given"). Other callables go through ``inspect.signature``, imported
only then: ``inspect`` costs ~7 ms to import, more than a cold start's whole
first call.
"""

from __future__ import annotations

import contextlib
import sys
import types
import weakref
from collections.abc import Callable

from ._typing import Any

__all__ = ("check_call",)

_CO_VARARGS, _CO_VARKEYWORDS = 0x04, 0x08  # inspect.CO_VARARGS, inspect.CO_VARKEYWORDS

_checkers: weakref.WeakKeyDictionary[Any, tuple[Callable[..., Any] | None, set[Any]]] = (
    weakref.WeakKeyDictionary()
)
"""Per function (a method's, a callable class's ``__call__``): its checker and
the call shapes that fitted. Keyed by the function, not the callable: a new
bound method or callable object each call (joblib's batches) finds it made."""


def check_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise the TypeError that ``fn(*args, **kwargs)`` would, before sending it."""
    kind = type(fn)
    if kind is types.FunctionType:
        key, bound = fn, False
    elif isinstance(fn, types.MethodType) and type(fn.__func__) is types.FunctionType:
        key, bound = fn.__func__, True
    elif type(call := getattr(kind, "__call__", None)) is types.FunctionType:  # noqa: B004
        key, bound = call, True  # an object whose class defines __call__ in Python
    elif hasattr(getattr(fn, "__func__", fn), "__code__") or hasattr(call, "__code__"):
        key, bound = fn, False  # another callable written in Python: inspect.signature
    else:
        return  # written in C (a builtin, a partial): its worker raises the same TypeError
    shape = (len(args), tuple(kwargs)) if kwargs else len(args)
    try:
        checker, shapes = _checkers[key]
    except (KeyError, TypeError):
        # A stub of the function (None if it cannot be made), or else inspect.
        checker = _stub(key) if type(key) is types.FunctionType else _by_signature(fn)
        shapes = set()
        with contextlib.suppress(TypeError):  # not weak-referenceable: made each time
            _checkers[key] = (checker, shapes)
    if checker is None or shape in shapes:
        return
    if bound:
        checker(None, *args, **kwargs)  # the stub's first parameter takes self's place
    else:
        checker(*args, **kwargs)
    shapes.add(shape)


def _stub(fn: types.FunctionType) -> Callable[..., None] | None:
    """A function with ``fn``'s parameters and name, whose body does nothing."""
    code = fn.__code__
    names = code.co_varnames
    n_pos, n_kwonly = code.co_argcount, code.co_kwonlyargcount
    first_default = n_pos - len(fn.__defaults__ or ())
    kw_defaults = fn.__kwdefaults__ or {}
    params = []
    for i, name in enumerate(names[:n_pos]):
        params.append(f"{name}=None" if i >= first_default else name)
        if i == code.co_posonlyargcount - 1:
            params.append("/")
    rest = n_pos + n_kwonly
    if code.co_flags & _CO_VARARGS:
        params.append(f"*{names[rest]}")
        rest += 1
    elif n_kwonly:
        params.append("*")
    params += [f"{k}=None" if k in kw_defaults else k for k in names[n_pos : n_pos + n_kwonly]]
    if code.co_flags & _CO_VARKEYWORDS:
        params.append(f"**{names[rest]}")
    namespace: dict[str, Any] = {}
    try:
        exec(f"def stub({', '.join(params)}): pass", namespace)
    except SyntaxError:  # pragma: no cover - parameter names only a code object could have
        return None
    stub: types.FunctionType = namespace["stub"]
    # Python names the function in its TypeError by the code's (qualified) name.
    if sys.version_info >= (3, 11):
        stub.__code__ = stub.__code__.replace(co_name=code.co_name, co_qualname=code.co_qualname)
    else:
        stub.__code__ = stub.__code__.replace(co_name=code.co_name)
    stub.__qualname__ = fn.__qualname__
    return stub


def _by_signature(fn: Callable[..., Any]) -> Callable[..., None] | None:
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None

    def check(*args: Any, **kwargs: Any) -> None:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            name = getattr(fn, "__qualname__", None) or repr(fn)
            raise TypeError(f"{name}() {exc}") from None

    return check
