"""``parfn.WorkerLocal``: a value built once per process, on first use, wherever it is used.

A front-end object with no engine behind it: it works the same in the caller
(plain calls, the serial and thread backends), in a process worker and on a
Dask worker. Each instance has a key, made when it is created; pickling keeps
the key and the factory, never the value. In each process, the values live
in one table by key, so every copy of one WorkerLocal that reaches a process
(in a closure, in a script's globals pickled with a function, in a function's
arguments) shares one value there, built the first time any of them reads
``.value``. A forked child forgets the table (``os.register_at_fork``): a
worker forked from a caller that had built the value builds its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from ._typing import Any, Generic, ParamSpec, TypeVar

__all__ = ("WorkerLocal",)

T = TypeVar("T")
P = ParamSpec("P")


class _Cell:
    """The value of one key in this process, and the lock that builds it once."""

    __slots__ = ("builder", "built", "lock", "value")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.built = False
        self.builder = 0  # the thread building it now (0: none)
        self.value: Any = None


_cells: dict[str, _Cell] = {}
_cells_lock = threading.Lock()
_generation = 0  # changes in a forked child: values built before the fork are not its own


def _forget_after_fork() -> None:
    global _cells, _cells_lock, _generation
    _cells = {}
    _cells_lock = threading.Lock()  # another thread may have held it across the fork
    _generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class WorkerLocal(Generic[T]):
    """A value built once per worker process, by ``factory(*args, **kwargs)``, on first use.

    For expensive set-up that each worker should do once and keep: a model, a
    connection, a big lookup table. Read it with ``.value`` inside the task;
    the first read in a process builds it, later reads (later tasks in that
    worker) get the same object::

        model = parfn.WorkerLocal(load_model, "weights.bin")

        @parfn.parallel
        def predict(x):
            return model.value.predict(x)

    It pickles (in closures and module globals alike) without its value, so
    the value itself need not be picklable. A replaced worker (a crash,
    ``max_tasks_per_worker``) builds it again. In the caller, and with the
    serial and thread backends, it is built once per process, by one thread
    while the others wait. If ``factory`` raises, ``.value`` raises, and the
    next read tries again.

    >>> import parfn
    >>> table = parfn.WorkerLocal(dict.fromkeys, range(3), 0)
    >>> table.value
    {0: 0, 1: 0, 2: 0}
    >>> table.value is table.value
    True
    """

    __slots__ = ("__weakref__", "_args", "_cell", "_factory", "_generation", "_key", "_kwargs")

    def __init__(self, factory: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> None:
        if not callable(factory):
            raise TypeError(f"WorkerLocal needs a callable that builds the value, not {factory!r}")
        self._factory: Callable[..., T] = factory
        self._args: tuple[Any, ...] = args
        self._kwargs: dict[str, Any] = kwargs
        self._key = os.urandom(12).hex()
        self._cell: _Cell | None = None
        self._generation = -1

    @property
    def value(self) -> T:
        """The value in this process, built by the first read here."""
        cell = self._cell
        if cell is not None and cell.built and self._generation == _generation:
            return cell.value  # type: ignore[no-any-return]
        return self._build()

    def _build(self) -> T:
        generation = _generation
        with _cells_lock:
            cell = _cells.get(self._key)
            if cell is None:
                cell = _cells[self._key] = _Cell()
        self._cell, self._generation = cell, generation
        if cell.builder == threading.get_ident():
            raise RuntimeError(
                f"the factory of {self!r} read the WorkerLocal's own .value while building it"
            )
        with cell.lock:
            if not cell.built:
                cell.builder = threading.get_ident()
                try:
                    cell.value = self._factory(*self._args, **self._kwargs)
                    cell.built = True
                finally:
                    cell.builder = 0
        return cell.value  # type: ignore[no-any-return]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (self._key, self._factory, self._args, self._kwargs))

    def __repr__(self) -> str:
        name = getattr(self._factory, "__qualname__", None) or repr(self._factory)
        cell = self._cell
        built = cell is not None and cell.built and self._generation == _generation
        return f"<parfn.WorkerLocal of {name}() {'built' if built else 'not built'} here>"


def _restore(
    key: str, factory: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> WorkerLocal[T]:
    """A WorkerLocal unpickled: the same key, so it shares this process's value."""
    local: WorkerLocal[T] = WorkerLocal.__new__(WorkerLocal)
    local._factory, local._args, local._kwargs, local._key = factory, args, kwargs, key
    local._cell, local._generation = None, -1
    return local
