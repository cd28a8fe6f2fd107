"""``parfn.ProcessPoolExecutor``: the standard library's executor, on a parfn pool.

A thin layer over :class:`parfn.Pool` that speaks ``concurrent.futures``: the
same constructor, ``submit``, ``map`` and ``shutdown`` as
``concurrent.futures.ProcessPoolExecutor``, with the same messages. What it
changes is what the pool underneath does better:

* a worker that dies fails only the task it was running, with
  :class:`parfn.WorkerCrashed` (a ``BrokenProcessPool``); it is replaced and
  the executor goes on. It never becomes broken;
* lambdas, closures and functions of ``__main__`` can be submitted (cloudpickle);
* a :class:`parfn.Parallel` with options (``f.options(timeout=5)``) keeps them.

The pool starts on the first ``submit``, and is shut down at interpreter exit
after its tasks finish, as the standard library's is.
"""

from __future__ import annotations

import atexit
import functools
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from itertools import islice

from ._dropin import WorkerProcess, cause_as, worker_processes
from ._task import Task
from ._typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from ._wire.errors import PoolClosed, SerializationError
from ._wire.serialize import ExceptionEnvelope

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

    from ._pool import Pool

__all__ = ("ProcessPoolExecutor",)

P = ParamSpec("P")
R = TypeVar("R")

_MAX_WINDOWS_WORKERS = 61  # as concurrent.futures.process


class ProcessPoolExecutor(Executor):
    """A drop-in ``concurrent.futures.ProcessPoolExecutor`` running on a parfn pool.

    >>> from parfn import ProcessPoolExecutor
    >>> with ProcessPoolExecutor(2) as ex:
    ...     list(ex.map(lambda x: x * x, range(4)))
    [0, 1, 4, 9]

    ``max_workers``: how many worker processes (default: the CPUs this process
    may use). ``mp_context``: a ``multiprocessing`` context; only its start
    method is used (default: parfn's, ``fork`` by the pool's zygote on Linux; with
    ``max_tasks_per_child``, ``spawn`` as in the standard library).
    ``initializer(*initargs)`` runs once in each worker as it starts.
    ``max_tasks_per_child``: replace a worker after it ran this many tasks.

    ``submit`` returns a :class:`parfn.Task`, a ``concurrent.futures.Future``.
    A worker that dies fails only its own task, with :class:`parfn.WorkerCrashed`
    (also a ``BrokenProcessPool``), and the executor keeps working.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: BaseContext | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
    ) -> None:
        if max_workers is None:
            from .backends._base import available_cpus

            self._max_workers = available_cpus()
            if sys.platform == "win32":  # pragma: no cover
                self._max_workers = min(_MAX_WINDOWS_WORKERS, self._max_workers)
        else:
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            if sys.platform == "win32" and max_workers > _MAX_WINDOWS_WORKERS:  # pragma: no cover
                raise ValueError(f"max_workers must be <= {_MAX_WINDOWS_WORKERS}")
            self._max_workers = max_workers

        if mp_context is None and max_tasks_per_child is not None:
            import multiprocessing

            mp_context = multiprocessing.get_context("spawn")
        self._mp_context = mp_context
        self._start_method: str | None = (
            None if mp_context is None else mp_context.get_start_method(allow_none=False)
        )

        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._initializer = initializer
        self._initargs = initargs

        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
            if self._start_method == "fork":
                raise ValueError(
                    "max_tasks_per_child is incompatible with"
                    " the 'fork' multiprocessing start method;"
                    " supply a different mp_context."
                )
        self._max_tasks_per_child = max_tasks_per_child

        self._lock = threading.Lock()
        self._pool: Pool | None = None
        self._shutdown_called = False
        self._exiting = False
        self._at_exit: Callable[[], None] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- the pool underneath ---------------------------------------------------------

    def _open_pool(self) -> Pool:
        """The pool, started on first use. Caller holds ``_lock``."""
        if self._pool is None:
            from ._pool import Pool

            # Workers start as tasks call for them, as the standard library's
            # do since 3.9, except with fork, which starts them all at once
            # there too (forking later, from a process with threads, is unsafe).
            self._pool = Pool(
                self._max_workers,
                start_method=self._start_method,
                max_tasks_per_worker=self._max_tasks_per_child,
                initializer=self._initializer,
                initargs=self._initargs,
                start_on_demand=self._start_method != "fork",
            )
            self._pool._error_hook = _recast
            # An executor dropped without shutdown() lets its tasks finish and
            # then closes its pool, as the standard library's does.
            self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)
            self._finalizer.atexit = False
            # Registered after the pool started, so it runs before any exit hook
            # of the pool's own: the tasks finish, then the pool closes.
            self._at_exit = _exit_hook(weakref.ref(self))
            atexit.register(self._at_exit)
        return self._pool

    def _interpreter_exit(self) -> None:
        """At interpreter exit: wait for the submitted tasks, as the stdlib does.

        Ctrl-C during that wait ends the remaining tasks at once.
        """
        with self._lock:
            self._exiting = True
            pool = self._pool
        if pool is None:
            return
        try:
            pool.shutdown(wait=True)
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_pending=True)

    @property
    def _processes(self) -> dict[int, WorkerProcess]:
        """The worker processes, by pid, as the standard library's private
        ``_processes`` (code in the wild counts or kills them): a snapshot,
        empty before the first ``submit``."""
        with self._lock:
            pool = self._pool
        if pool is None:
            return {}
        return {p.pid: p for p in worker_processes(pool)}

    # -- concurrent.futures.Executor ---------------------------------------------------

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Task[R]:
        """Schedule ``fn(*args, **kwargs)``; returns a :class:`parfn.Task` at once.

        As in the standard library, a problem with the call itself (its
        arguments cannot be pickled, or do not fit ``fn``) is reported by the
        returned task, not raised here. After :meth:`shutdown` this raises
        :class:`parfn.PoolClosed` (a ``RuntimeError``), with the standard
        library's message.
        """
        with self._lock:
            if self._shutdown_called:
                raise PoolClosed("cannot schedule new futures after shutdown")
            if self._exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            pool = self._open_pool()
        try:
            task = pool.spawn(fn, *args, **kwargs)
        except PoolClosed:
            raise PoolClosed("cannot schedule new futures after shutdown") from None
        except (SerializationError, TypeError) as exc:
            task = Task()
            task.set_exception(exc)
            return task
        return task

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[R]:
        """An iterator over ``fn`` applied to the items of ``iterables``, in order.

        As in the standard library: every call is submitted now (the iterables
        are read to the end), ``timeout`` bounds the whole wait from this call
        (``TimeoutError``), an item's exception is raised when the iteration
        reaches it, and leaving the iteration early cancels the calls that
        have not started. ``chunksize`` sends that many items per task; a
        :class:`parfn.Parallel` with options is sent item by item, so that its
        ``timeout`` and ``retries`` apply to each item.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        args = zip(*iterables, strict=False)
        if chunksize == 1 or getattr(fn, "_parfn_options", None) is not None:
            fs: list[Future[Any]] = [self.submit(fn, *a) for a in args]
            return _results(fs, end_time, chunked=False)
        # fn inside the function, not among the arguments: it travels as
        # functions do (a script's by name: it runs with the worker's globals).
        run_chunk = functools.partial(_run_chunk, fn)
        fs = [self.submit(run_chunk, chunk) for chunk in _batched(args, chunksize)]
        return _results(fs, end_time, chunked=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with ``wait``, return once every task has finished.

        ``cancel_futures=True`` cancels the tasks that have not started; the
        running ones finish, as in the standard library. Even with
        ``wait=False`` the remaining tasks run to completion in the
        background. Calling it again does nothing more.
        """
        with self._lock:
            self._shutdown_called = True
            pool = self._pool
            at_exit, self._at_exit = self._at_exit, None
        if at_exit is not None:
            atexit.unregister(at_exit)
        if self._finalizer is not None:
            self._finalizer.detach()
        if pool is not None:
            pool.shutdown(wait=wait, cancel_pending=cancel_futures)


def _recast(error: BaseException) -> None:
    """Give a task's exception the standard library's ``_RemoteTraceback`` cause.

    ``concurrent.futures.process`` is imported on the first failure, not with
    this module: it imports most of ``multiprocessing`` (~10 ms of a cold start).
    """
    global _recast_hook
    if _recast_hook is None:
        from concurrent.futures.process import _RemoteTraceback

        _recast_hook = cause_as(_RemoteTraceback)
    _recast_hook(error)


_recast_hook: Callable[[BaseException], None] | None = None


def _exit_hook(ref: weakref.ref[ProcessPoolExecutor]) -> Callable[[], None]:
    """An atexit hook that holds its executor weakly."""

    def at_exit() -> None:
        executor = ref()
        if executor is not None:
            executor._interpreter_exit()

    return at_exit


def _run_chunk(
    fn: Callable[..., R], chunk: tuple[tuple[Any, ...], ...]
) -> tuple[list[R], ExceptionEnvelope | None]:
    """Run in a worker: ``fn`` on each argument tuple of a ``map`` chunk.

    Stops at the first item that raises, and returns the values before it with
    that exception (which arrives as itself, with the worker's traceback), so
    that the caller raises it at that item, not at the start of the chunk.
    """
    values: list[R] = []
    for args in chunk:
        try:
            values.append(fn(*args))
        except (Exception, SystemExit) as exc:
            return values, ExceptionEnvelope(exc)
    return values, None


def _batched(it: Iterator[tuple[Any, ...]], n: int) -> Iterator[tuple[tuple[Any, ...], ...]]:
    while chunk := tuple(islice(it, n)):
        yield chunk


def _results(fs: list[Future[Any]], end_time: float | None, *, chunked: bool) -> Iterator[Any]:
    """Yield the results of ``fs`` in order, keeping no reference to one yielded.

    On leaving early (an exception, a timeout, ``close()``), the futures not yet
    started are cancelled; as in the standard library, running ones finish.
    """
    try:
        fs.reverse()
        while fs:
            timeout = None if end_time is None else end_time - time.monotonic()
            if not chunked:
                yield _result_or_cancel(fs.pop(), timeout)
                continue
            # The envelope from _run_chunk arrives here as the exception itself.
            error: BaseException | None
            chunk, error = _result_or_cancel(fs.pop(), timeout)
            chunk.reverse()
            while chunk:
                yield chunk.pop()
            if error is not None:
                _recast(error)
                raise error
    finally:
        for future in fs:
            Future.cancel(future)


def _result_or_cancel(future: Future[Any], timeout: float | None) -> Any:
    """``future.result(timeout)``; if that raises, cancel ``future`` unless it started."""
    try:
        try:
            return future.result(timeout)
        finally:
            Future.cancel(future)  # not Task.cancel: a running task is left to finish
    finally:
        del future  # break the cycle through a raised exception's traceback
