"""``@parallel`` and the ``Parallel`` object it makes of a function."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from types import EllipsisType

from . import _runtime
from ._typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar, overload
from .backends._base import Options

if TYPE_CHECKING:
    from ._mapping import MapIterator
    from ._task import Task

__all__ = ("Parallel", "parallel")

P = ParamSpec("P")
R = TypeVar("R")


class Parallel(Generic[P, R]):
    """A function that can also run in parallel: what ``@parallel`` returns.

    >>> from parfn import parallel
    >>> @parallel
    ... def square(x: int) -> int:
    ...     return x * x
    >>> square(3)                 # here, as a plain call
    9

    ``square.apply(3)`` runs it on a worker and waits; ``square.spawn(3)``
    returns a :class:`Task` at once; ``square.map(xs)`` runs it on every item.
    The calls go to the pool of the enclosing ``with parfn.Pool(...)`` block,
    or to the default pool.
    """

    _parfn_parallel = True  # how a worker recognises one without importing this module
    __qualname__: str  # set by functools.update_wrapper

    def __init__(self, fn: Callable[P, R], options: Options) -> None:
        functools.update_wrapper(self, fn)
        self.__wrapped__: Callable[P, R] = fn
        self._parfn_options = options

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the plain function here, in this process."""
        return self.__wrapped__(*args, **kwargs)

    def __repr__(self) -> str:
        options = self._parfn_options
        extra = "".join(
            f", {name}={getattr(options, name)!r}"
            for name in ("timeout", "retries")
            if getattr(options, name) != getattr(Options(), name)
        )
        return f"<parallel {self.__module__}.{self.__qualname__}{extra}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # A module-level one by reference (its module holds it, not the plain
        # function); others, lambdas and ``__main__`` included, by value.
        from ._wire.serialize import resolve  # here: decorating must not load the wire

        module, qualname = self.__module__, self.__qualname__
        if module != "__main__":
            try:
                if resolve(module, qualname) is self:
                    return (resolve, (module, qualname))
            except Exception:
                pass
        return (Parallel, (self.__wrapped__, self._parfn_options))

    def options(
        self, *, timeout: float | EllipsisType | None = ..., retries: int | None = None
    ) -> Parallel[P, R]:
        """A copy with other per-task options.

        ``timeout``: seconds each call may run, from its start (None: no limit);
        ``retries``: how many more times a call that raised, crashed or timed
        out is run.
        """
        current = self._parfn_options
        return Parallel(
            self.__wrapped__,
            Options(
                timeout=current.timeout if isinstance(timeout, EllipsisType) else timeout,
                retries=current.retries if retries is None else retries,
            ),
        )

    # -- running it ---------------------------------------------------------------

    def apply(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run on a worker and wait for the result (like ``Pool.apply``)."""
        return _runtime.current_pool().apply(self, *args, **kwargs)

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> Task[R]:
        """Submit, and return a :class:`Task` at once (like ``Pool.apply_async``)."""
        return _runtime.current_pool().spawn(self, *args, **kwargs)

    @overload
    def map(
        self,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        progress: object = False,
        return_exceptions: Literal[False] = False,
    ) -> list[R]: ...

    @overload
    def map(
        self,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        progress: object = False,
        return_exceptions: bool,
    ) -> list[R | BaseException]: ...

    def map(
        self,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        progress: object = False,
        return_exceptions: bool = False,
    ) -> list[R] | list[R | BaseException]:
        """Run on every item in parallel; a list in input order.

        Several iterables zip as in the builtin ``map``.
        """
        return _runtime.current_pool().map(
            self,
            *iterables,
            chunksize=chunksize,
            progress=progress,
            return_exceptions=return_exceptions,
        )

    @overload
    def starmap(
        self,
        iterable: Iterable[Iterable[Any]],
        *,
        chunksize: int | None = None,
        progress: object = False,
        return_exceptions: Literal[False] = False,
    ) -> list[R]: ...

    @overload
    def starmap(
        self,
        iterable: Iterable[Iterable[Any]],
        *,
        chunksize: int | None = None,
        progress: object = False,
        return_exceptions: bool,
    ) -> list[R | BaseException]: ...

    def starmap(
        self,
        iterable: Iterable[Iterable[Any]],
        *,
        chunksize: int | None = None,
        progress: object = False,
        return_exceptions: bool = False,
    ) -> list[R] | list[R | BaseException]:
        """``f(*args)`` for each tuple; a list in input order."""
        return _runtime.current_pool().starmap(
            self,
            iterable,
            chunksize=chunksize,
            progress=progress,
            return_exceptions=return_exceptions,
        )

    def imap(
        self, *iterables: Iterable[Any], chunksize: int | None = None, progress: object = False
    ) -> MapIterator[R]:
        """Lazy ``map`` in input order; reads input only a bounded window ahead."""
        return _runtime.current_pool().imap(
            self, *iterables, chunksize=chunksize, progress=progress
        )

    def imap_unordered(
        self, *iterables: Iterable[Any], chunksize: int | None = None, progress: object = False
    ) -> MapIterator[R]:
        """Lazy ``map`` in completion order; reads input a bounded window ahead."""
        return _runtime.current_pool().imap_unordered(
            self, *iterables, chunksize=chunksize, progress=progress
        )


@overload
def parallel(fn: Callable[P, R], /) -> Parallel[P, R]: ...


@overload
def parallel(
    *, timeout: float | None = None, retries: int = 0
) -> Callable[[Callable[P, R]], Parallel[P, R]]: ...


def parallel(
    fn: Callable[P, R] | None = None, /, *, timeout: float | None = None, retries: int = 0
) -> Parallel[P, R] | Callable[[Callable[P, R]], Parallel[P, R]]:
    """Make a function runnable in parallel: ``@parallel`` or ``@parallel(timeout=5)``.

    >>> from parfn import parallel
    >>> inc = parallel(lambda x: x + 1)
    >>> inc(1)
    2

    ``timeout``: seconds each call may run, from its start; past it the worker
    is ended and replaced and the call raises :class:`parfn.TaskTimeout`.
    ``retries``: how many more times a call that raised, crashed or timed out
    is run.
    """
    options = Options(timeout=timeout, retries=retries)
    if fn is None:
        return lambda f: _make(f, options)
    return _make(fn, options)


def _make(fn: Callable[P, R], options: Options) -> Parallel[P, R]:
    if isinstance(fn, Parallel):
        return Parallel(fn.__wrapped__, options)
    if not callable(fn):
        raise TypeError(
            f"@parallel decorates a function, not {type(fn).__name__} {fn!r}; "
            "use @parallel or @parallel(timeout=..., retries=...)"
        )
    return Parallel(fn, options)
