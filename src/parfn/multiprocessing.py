"""``parfn.multiprocessing.Pool``: the standard library's ``multiprocessing.Pool``, on parfn.

>>> from parfn.multiprocessing import Pool   # instead of: from multiprocessing import Pool
>>> with Pool(2) as p:
...     p.map(abs, [-1, -2, 3])
[1, 2, 3]

The same constructor, methods, ``AsyncResult`` (``get``, ``wait``, ``ready``,
``successful``), callbacks and errors as ``multiprocessing.Pool``, so code
written for it runs with only the import changed. It runs on a
:class:`parfn.Pool` of processes, which changes what goes wrong:

* a worker that dies (a signal, ``os._exit``, a segfault) fails only the task
  it was running, with :class:`parfn.WorkerCrashed`, and is replaced; the
  standard library's pool waits for ever on that task;
* lambdas, closures and functions of ``__main__`` can be sent (cloudpickle);
* ``terminate()`` (and leaving a ``with`` block) resolves every unfinished
  result with ``CancelledError`` rather than leaving it unresolved.

The differences by design, each with its reason, are listed in
``docs/guide/multiprocessing.md``, with CPython's own Pool tests run against it.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import multiprocessing.pool
import queue
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import CancelledError, Future

from ._dropin import Raised, WorkerProcess, call_catching, cause_as, run_chunk, worker_processes
from ._pool import Pool as _ParfnPool
from ._typing import Any, Generic, TypeVar
from ._wire.errors import SerializationError
from .backends._base import available_cpus

__all__ = (
    "ApplyResult",
    "AsyncResult",
    "IMapIterator",
    "IMapUnorderedIterator",
    "MapResult",
    "Pool",
)

T = TypeVar("T")

RUN = multiprocessing.pool.RUN
CLOSE = multiprocessing.pool.CLOSE
TERMINATE = multiprocessing.pool.TERMINATE

# (typeshed's stubs of multiprocessing.pool lack these two)
_RemoteTraceback: type[Exception] = multiprocessing.pool.RemoteTraceback  # type: ignore[attr-defined]
_MaybeEncodingError: type[Exception] = multiprocessing.pool.MaybeEncodingError  # type: ignore[attr-defined]
_recast = cause_as(_RemoteTraceback)
_NO_KWDS: Mapping[str, Any] = {}


def _as_stdlib_error(exc: BaseException) -> BaseException:
    """The exception the standard library's pool gives where parfn's gives ``exc``.

    The worker's traceback becomes a ``multiprocessing.pool.RemoteTraceback``
    cause; a result that cannot be pickled, a ``MaybeEncodingError`` (caused
    by parfn's ``SerializationError``, which says what and why).
    """
    _recast(exc)
    if isinstance(exc, SerializationError) and str(exc).startswith("the result"):
        what = str(exc).split(" cannot be pickled", 1)[0]
        error = _MaybeEncodingError(exc, f"<{what}>")
        error.__cause__ = exc
        return error
    return exc


def _argument_error(exc: SerializationError) -> BaseException:
    """An argument that cannot be pickled: the pickler's own exception, as the
    standard library raises, with parfn's explanation as a note."""
    original = exc.__cause__
    if original is None or not isinstance(original, Exception):
        return exc
    if sys.version_info >= (3, 11):
        original.add_note(str(exc))
    return original


# -- results ---------------------------------------------------------------------------


class ApplyResult(Generic[T]):
    """The result of ``apply_async`` (``multiprocessing.pool.AsyncResult``).

    ``callback(value)`` or ``error_callback(exception)`` runs before ``wait()``
    and ``get()`` return, as in the standard library. A callback that raises
    has its traceback printed; the result is still set.
    """

    def __init__(
        self,
        callback: Callable[[T], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._success: bool | None = None
        self._value: Any = None

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return bool(self._success)

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> T:
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value  # type: ignore[no-any-return]
        raise self._value

    def _set(self, success: bool, value: Any) -> None:
        self._success, self._value = success, value
        callback = self._callback if success else self._error_callback
        self._callback = self._error_callback = None
        try:
            if callback is not None:
                callback(value)
        except Exception:
            traceback.print_exc()
        finally:
            self._event.set()

    def _from_future(self, future: Future[Any]) -> None:
        """Settle from a parfn Task (its done callback)."""
        if future.cancelled():
            self._set(False, CancelledError("the pool was terminated before this task finished"))
            return
        error = future.exception()
        if error is None:
            self._set(True, future.result())
        else:
            self._set(False, _as_stdlib_error(error))


AsyncResult = ApplyResult


class MapResult(ApplyResult[list[T]]):
    """The result of ``map_async`` and ``starmap_async``: every item's value, in order.

    It fails at the first chunk that fails, as the standard library's does.
    """

    def __init__(
        self,
        chunks: int,
        callback: Callable[[list[T]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        super().__init__(callback, error_callback)
        self._parts: list[list[T] | None] = [None] * chunks
        self._left = chunks
        self._lock = threading.Lock()
        if not chunks:
            self._set(True, [])

    def _chunk_done(self, index: int, future: Future[Any]) -> None:
        if self.ready():
            return
        error: BaseException | None
        if future.cancelled():
            error = CancelledError("the pool was terminated before this task finished")
        else:
            error = future.exception()
        with self._lock:
            if self._success is not None:
                return
            if error is not None:
                self._success = False
            else:
                self._parts[index] = future.result()
                self._left -= 1
                if self._left:
                    return
                self._success = True
        if error is not None:
            self._parts = []
            self._set(False, _as_stdlib_error(error))
        else:
            values = list(itertools.chain.from_iterable(self._parts))  # type: ignore[arg-type]
            self._parts = []
            self._set(True, values)


class IMapIterator(Generic[T]):
    """The iterator of ``imap``: values in input order; ``next(timeout)`` as in
    the standard library (``multiprocessing.TimeoutError`` when it runs out)."""

    _ordered = True

    def __init__(self, values: Iterator[T], guard: _Guard) -> None:
        self._values = values
        self._guard = guard
        self._given = 0  # values returned so far
        self._queue: queue.SimpleQueue[tuple[bool, Any]] | None = None
        self._lock = threading.Lock()

    def __iter__(self) -> IMapIterator[T]:
        return self

    def next(self, timeout: float | None = None) -> T:
        if timeout is None and self._queue is None:
            return self._next()
        with self._lock:
            if self._queue is None:  # a thread to wait on: only once a timeout is asked for
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._pump, name="parfn-imap", daemon=True).start()
        try:
            ok, value = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise multiprocessing.TimeoutError from None
        if ok:
            return value  # type: ignore[no-any-return]
        if isinstance(value, StopIteration):
            self._queue.put((False, value))  # it stays ended
        raise value

    __next__ = next

    def _next(self) -> T:
        guard = self._guard
        if guard.error is not None and self._ordered and self._given >= guard.stop_at:
            self._values = iter(())  # what was read of the failing chunk is dropped
        try:
            value = next(self._values)
        except StopIteration:
            error, guard.error = guard.error, None
            if error is not None:
                raise error from None
            raise
        except Exception as exc:
            raise _as_stdlib_error(exc) from exc.__cause__
        self._given += 1
        if isinstance(value, Raised):
            raise _as_stdlib_error(value.error)
        return value

    def _pump(self) -> None:
        assert self._queue is not None
        while True:
            try:
                self._queue.put((True, self._next()))
            except BaseException as exc:
                self._queue.put((False, exc))
                if isinstance(exc, StopIteration):
                    return


class IMapUnorderedIterator(IMapIterator[T]):
    """The iterator of ``imap_unordered``: values in completion order."""

    _ordered = False


class _Guard:
    """Reads the caller's iterable for a lazy map; an exception it raises ends
    the input there, and is raised after the values before it (as the
    standard library's ``imap`` does)."""

    def __init__(self, iterable: Iterable[Any], chunksize: int) -> None:
        self._it = iter(iterable)
        self._chunksize = max(1, chunksize)
        self._read = 0
        self.error: BaseException | None = None
        self.stop_at = 0
        """How many values come before the error: those of the chunks before the
        one it ended (the standard library drops that chunk's values)."""

    def __iter__(self) -> _Guard:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self._it)
        except StopIteration:
            raise
        except Exception as exc:
            self.error = exc
            self.stop_at = self._read - self._read % self._chunksize
            raise StopIteration from None
        self._read += 1
        return item


# -- the pool ----------------------------------------------------------------------------


class Pool:
    """A drop-in ``multiprocessing.Pool`` running on a parfn process pool.

    ``processes``: how many workers (default: the CPUs this process may use).
    ``initializer(*initargs)`` runs in each worker as it starts.
    ``maxtasksperchild``: replace a worker after it ran this many tasks.
    ``context``: a ``multiprocessing`` context, read for its start method only
    (default: the start method set with ``multiprocessing.set_start_method``,
    else parfn's own: on Linux, fork by the pool's zygote, which never forks a
    process whose other threads may hold a lock).
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
    ) -> None:
        self._state = TERMINATE  # until it runs: __del__ has nothing to say
        if processes is None:
            processes = available_cpus()
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int)
            or isinstance(maxtasksperchild, bool)
            or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if context is not None:
            start_method = context.get_start_method()
        else:
            # Read now, as the standard library's pool reads its context when
            # made; None (never set): parfn's default.
            start_method = multiprocessing.get_start_method(allow_none=True)
        self._processes = processes
        self._parfn = _ParfnPool(
            processes,
            start_method=start_method,
            max_tasks_per_worker=maxtasksperchild,
            initializer=initializer,
            initargs=tuple(initargs),
        )
        self._parfn._error_hook = _recast
        # Every worker starts now, as in the standard library (``_pool`` lists
        # them at once).
        self._repopulate_pool()
        self._state = RUN
        # Dropped without close() or terminate(): its workers are ended, as
        # the standard library's are.
        self._finalizer = weakref.finalize(self, _terminate_now, self._parfn)
        self._finalizer.atexit = False

    # -- what code in the wild reads ----------------------------------------------------

    @property
    def _pool(self) -> list[WorkerProcess]:
        """The worker processes (``pid``, ``is_alive()``, ...), as the
        standard library's private ``_pool`` list: a snapshot."""
        return worker_processes(self._parfn)

    def _repopulate_pool(self) -> None:
        """Start the workers the pool lacks now (the pool does it by itself too)."""
        worker_processes(self._parfn)

    def __repr__(self) -> str:
        cls = type(self)
        return (
            f"<{cls.__module__}.{cls.__qualname__} state={self._state} pool_size={self._processes}>"
        )

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_state", TERMINATE) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    # -- single calls --------------------------------------------------------------------

    def apply(
        self, func: Callable[..., T], args: Iterable[Any] = (), kwds: Mapping[str, Any] = _NO_KWDS
    ) -> T:
        """``func(*args, **kwds)`` in a worker; waits for the result."""
        self._check_running()
        try:
            return self._parfn.apply(func, *args, **kwds)
        except SerializationError as exc:
            error = _as_stdlib_error(exc)
            if error is exc:
                error = _argument_error(exc)
            if error is exc:
                raise
            raise error from error.__cause__

    def apply_async(
        self,
        func: Callable[..., T],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] = _NO_KWDS,
        callback: Callable[[T], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> ApplyResult[T]:
        """Submit ``func(*args, **kwds)``; returns an :class:`ApplyResult` at once."""
        self._check_running()
        result: ApplyResult[T] = ApplyResult(callback, error_callback)
        try:
            task = self._parfn.spawn(func, *args, **kwds)
        except SerializationError as exc:
            result._set(False, _argument_error(exc))
            return result
        except TypeError as exc:  # the arguments do not fit the function
            result._set(False, exc)
            return result
        task.add_done_callback(result._from_future)
        return result

    # -- maps --------------------------------------------------------------------------------

    def map(
        self, func: Callable[[Any], T], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[T]:
        """``func`` on every item, in parallel; a list in input order."""
        return self._map_async(func, iterable, False, chunksize).get()

    def starmap(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
    ) -> list[T]:
        """``func(*args)`` for each tuple of ``iterable``; a list in input order."""
        return self._map_async(func, iterable, True, chunksize).get()

    def map_async(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[list[T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> MapResult[T]:
        """``map``, returning a :class:`MapResult` at once."""
        return self._map_async(func, iterable, False, chunksize, callback, error_callback)

    def starmap_async(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> MapResult[T]:
        """``starmap``, returning a :class:`MapResult` at once."""
        return self._map_async(func, iterable, True, chunksize, callback, error_callback)

    def _map_async(
        self,
        func: Callable[..., T],
        iterable: Iterable[Any],
        star: bool,
        chunksize: int | None,
        callback: Callable[[list[T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> MapResult[T]:
        self._check_running()
        items = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        if chunksize < 1:
            chunksize = 1  # an empty input
        chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        del items
        result: MapResult[T] = MapResult(len(chunks), callback, error_callback)
        # One function for every chunk, so that it is pickled once.
        runner = functools.partial(run_chunk, func, star)
        for index, chunk in enumerate(chunks):
            try:
                task = self._parfn.spawn(runner, chunk)
            except SerializationError as exc:
                result._set(False, _argument_error(exc))
                break
            task.add_done_callback(_ChunkDone(result, index))
        return result

    def imap(
        self, func: Callable[[Any], T], iterable: Iterable[Any], chunksize: int = 1
    ) -> IMapIterator[T]:
        """Lazy ``map``, in input order, reading the input a bounded window ahead."""
        self._check_running()
        guard = _Guard(iterable, chunksize)
        runner = functools.partial(call_catching, func)  # an item's error does not end it
        return IMapIterator(self._parfn.imap(runner, guard, chunksize=chunksize), guard)

    def imap_unordered(
        self, func: Callable[[Any], T], iterable: Iterable[Any], chunksize: int = 1
    ) -> IMapUnorderedIterator[T]:
        """Lazy ``map`` in completion order."""
        self._check_running()
        guard = _Guard(iterable, chunksize)
        runner = functools.partial(call_catching, func)
        values = self._parfn.imap_unordered(runner, guard, chunksize=chunksize)
        return IMapUnorderedIterator(values, guard)

    # -- ending --------------------------------------------------------------------------

    def close(self) -> None:
        """Accept no more tasks; the workers exit once the submitted ones are done."""
        if self._state == RUN:
            self._state = CLOSE
            self._parfn.shutdown(wait=False)

    def terminate(self) -> None:
        """End at once: running tasks are stopped (their workers killed), queued
        ones dropped; every unfinished result raises ``CancelledError``."""
        self._state = TERMINATE
        self._finalizer.detach()
        self._parfn.terminate()

    def join(self) -> None:
        """Wait for the workers to exit, after :meth:`close` or :meth:`terminate`."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        self._finalizer.detach()
        self._parfn.shutdown(wait=True)

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()


class _ChunkDone:
    """A chunk task's done callback: its values go to their place in the MapResult."""

    __slots__ = ("index", "result")

    def __init__(self, result: MapResult[Any], index: int) -> None:
        self.result = result
        self.index = index

    def __call__(self, future: Future[Any]) -> None:
        self.result._chunk_done(self.index, future)


def _terminate_now(pool: _ParfnPool) -> None:
    """Kill the workers of a pool dropped while running, without waiting (a finalizer)."""
    pool._closed = True
    pool._backend.shutdown(False, True, terminate=True)
