"""``parfn.Pool``: the front end every call goes through, whatever the backend.

It checks arguments in the caller, wraps single calls as Tasks and maps as a
MapRun, and hands Jobs to its backend (``backends``). A ``with`` block makes
it the current pool of this context (``_scope``).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType

from . import _scope
from ._callcheck import check_call
from ._mapping import MapIterator, MapRun
from ._stats import CANCELLED, FAILED, PoolStats, Tally
from ._typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, overload
from ._wire.errors import PoolClosed
from .backends import BACKENDS, load
from .backends._base import Backend, Item, Job, Options

if TYPE_CHECKING:
    from ._task import Task

__all__ = ("MapIterator", "Pool")

P = ParamSpec("P")
R = TypeVar("R")

_START_METHODS = ("fork", "forkserver", "spawn")


class _CallSink:
    """Where a blocking ``apply``'s outcome waits for its caller: what a Task
    does for ``spawn``, without being a ``concurrent.futures.Future``, whose
    module loads ``logging`` (~3 ms, a tenth of a short program's start).
    The caller waits in ``outcome()``; the backend calls ``start`` and
    ``deliver``, from any thread (the caller's own, when it talks to an idle
    worker directly)."""

    __slots__ = (
        "backend", "error", "error_hook", "job", "ready", "stopped", "tally", "token", "value",
    )  # fmt: skip

    def __init__(self, backend: Backend, tally: Tally, error_hook: ErrorHook | None) -> None:
        self.backend = backend
        self.tally = tally
        self.error_hook = error_hook
        self.job: Job | None = None
        self.value: Any = None
        self.error: BaseException | None = None
        self.stopped = False
        self.ready = threading.Lock()  # held until the outcome is here
        self.ready.acquire()
        self.token = bytearray(1)  # see TaskSink

    def start(self) -> bool:
        return not self.stopped

    def deliver(
        self, lo: int, values: Any, errors: dict[int, BaseException], elapsed: float
    ) -> None:
        job, self.job = self.job, None
        if job is None:
            return  # delivered already (a stopped call's CancelledError)
        error = errors.get(lo)
        outcome = self.tally.call(self, job.fn, error, elapsed)
        if error is None:
            self.value = values[0]
        else:
            if self.error_hook is not None and outcome == FAILED:
                self.error_hook(error)
            self.error = error
        self.ready.release()

    def outcome(self) -> Any:
        """Wait for the result, and return it or raise the call's exception.

        Ctrl-C while waiting stops the call (a queued one never starts, a
        running one is ended if its backend can), then raises KeyboardInterrupt.
        """
        try:
            self.ready.acquire()
        except KeyboardInterrupt:
            self.cancel()
            raise
        if self.error is not None:
            error, self.error = self.error, None  # no cycle through its traceback
            raise error
        return self.value

    def cancel(self) -> None:
        """The caller stopped waiting (Ctrl-C): drop or stop the call. It counts
        as cancelled unless its outcome came first (a backend that cannot stop
        a running call lets it finish unobserved; the serial backend's was
        interrupted where it ran)."""
        self.stopped = True
        job = self.job
        if job is not None:
            self.backend.cancel(job)
            self.tally.task(self, "", CANCELLED, 0.0)


def _tasks() -> Any:
    """``parfn._task``, imported by the first ``spawn``: a Task is a
    ``concurrent.futures.Future``, and that module loads ``logging`` (~3 ms
    that a program of ``apply`` and ``map`` calls does not pay)."""
    global _task_module
    if _task_module is None:
        from . import _task

        _task_module = _task
    return _task_module


_task_module: Any = None


ErrorHook = Callable[[BaseException], None]
"""Called with a task's exception before its Task gets it (see ``Pool._error_hook``)."""

_NO_OPTIONS = Options()


def _unwrap(fn: Any) -> tuple[Callable[..., Any], Options]:
    """The plain function and options of ``fn`` (a Parallel keeps its options)."""
    options = getattr(fn, "_parfn_options", None)
    if options is not None:
        return fn.__wrapped__, options
    if not callable(fn):
        raise TypeError(f"expected a function to run, not {type(fn).__name__} {fn!r}")
    return fn, _NO_OPTIONS


class Pool:
    """A pool of workers: processes (default), threads, the caller, or a Dask cluster.

    >>> import parfn
    >>> with parfn.Pool(2, backend="thread") as pool:
    ...     pool.map(abs, [-1, -2, 3])
    [1, 2, 3]

    Inside the ``with`` block, decorated functions run on this pool. Leaving
    the block normally waits for every submitted task; leaving it by an
    exception (Ctrl-C included) cancels queued tasks and ends running ones.

    ``workers``: how many (default: the CPUs this process may use).
    ``backend``: ``"process"``, ``"thread"``, ``"serial"`` or ``"dask"``.
    ``start_method``: ``"fork"`` (default on Linux: workers forked by the
    pool's zygote), ``"forkserver"`` or ``"spawn"``, for the process backend
    (see ``docs/guide/workers.md``). ``max_tasks_per_worker``: replace a
    worker process after it ran this many items. ``initializer(*initargs)``
    runs once in each worker as it starts. ``threads_per_worker`` caps BLAS and
    OpenMP threads per worker (default ``max(1, cpus // workers)``), and
    ``max_memory_per_worker`` (bytes, or ``"512MiB"``) its memory: see
    docs/guide/resources.md. Other keywords go to the backend (``address=``
    and ``client=`` for Dask).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        backend: str = "process",
        start_method: str | None = None,
        max_tasks_per_worker: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        threads_per_worker: int | None = None,
        max_memory_per_worker: int | str | None = None,
        **backend_options: Any,
    ) -> None:
        if workers is not None and (
            isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
        ):
            raise ValueError(f"workers must be an int >= 1 or None (all CPUs), not {workers!r}")
        if backend not in BACKENDS:
            allowed = ", ".join(repr(b) for b in BACKENDS)
            raise ValueError(f"unknown backend {backend!r}; choose one of {allowed}")
        options = dict(backend_options)
        if start_method is not None:
            if start_method not in _START_METHODS:
                allowed = ", ".join(repr(m) for m in _START_METHODS)
                raise ValueError(f"unknown start method {start_method!r}; choose one of {allowed}")
            if backend != "process":
                raise ValueError("start_method applies to the process backend only")
            options["start_method"] = start_method
        if max_tasks_per_worker is not None:
            if backend != "process":
                raise ValueError("max_tasks_per_worker applies to the process backend only")
            options["max_tasks_per_worker"] = max_tasks_per_worker
        for name, value in (
            ("threads_per_worker", threads_per_worker),
            ("max_memory_per_worker", max_memory_per_worker),
        ):
            if value is not None:
                if backend != "process":
                    raise ValueError(f"{name} applies to the process backend only")
                options[name] = value
        if initializer is not None:
            if not callable(initializer):
                raise TypeError(f"initializer must be callable, not {initializer!r}")
            options["initializer"] = initializer
            options["initargs"] = tuple(initargs)
        self.backend_name = backend
        self._backend: Backend = load(backend, workers, **options)
        self._tally = Tally()
        self._closed = False
        self._pid = os.getpid()  # the child of a user's os.fork() cannot use it
        self._tokens: list[Any] = []
        self._lock = threading.Lock()
        self._error_hook: ErrorHook | None = None
        """The drop-ins' hook: it gives a task's exception the standard
        library's traceback type as its cause, before any caller sees it."""
        # Set on the default pool (by ``_runtime``): the pool that replaced
        # it after ``parfn.shutdown()``, for calls that raced that shutdown.
        self._successor: Callable[[], Pool | None] | None = None

    @property
    def workers(self) -> int:
        """How many items this pool runs at once."""
        return self._backend.workers

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<parfn.Pool {self.backend_name} workers={self.workers} {state}>"

    # -- with --------------------------------------------------------------------------

    def __enter__(self) -> Pool:
        self._tokens.append(_scope.current.set(self))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _scope.current.reset(self._tokens.pop())
        if self._tokens:
            return
        if exc_type is None:
            self.shutdown(wait=True)
        else:
            self.terminate()

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop the pool; with ``wait``, after every task still to run has finished.

        ``cancel_pending=True`` cancels the tasks that have not started (they
        raise ``CancelledError``) and lets running ones finish, as the
        standard library's ``cancel_futures=True`` does. A second call only
        waits (or cancels) if asked to. Using the pool afterwards raises
        :class:`parfn.PoolClosed`.
        """
        with self._lock:
            again, self._closed = self._closed, True
        if again and not cancel_pending and not wait:
            return
        if os.getpid() == self._pid:  # a forked child must not stop its parent's workers
            self._backend.shutdown(wait, cancel_pending)

    def terminate(self) -> None:
        """Close the pool and end every task at once, running ones included.

        Tasks not started and tasks running raise ``CancelledError``; the
        process backend kills the workers running them (the thread backend
        cannot stop a running thread: it runs on, unobserved). Returns once
        the workers are gone. Leaving a ``with`` block by an exception does this.

        >>> import parfn
        >>> pool = parfn.Pool(1, backend="thread")
        >>> pool.terminate()
        >>> pool.terminate()  # again: nothing more to do
        """
        with self._lock:
            self._closed = True
        if os.getpid() == self._pid:  # a forked child must not stop its parent's workers
            self._backend.shutdown(True, True, terminate=True)

    def stats(self) -> PoolStats:
        """A snapshot of this pool's tasks and workers (see :class:`PoolStats`).

        Cheap: call it as often as you like, from any thread, during a
        ``map`` too; it still works after the pool is shut down.
        """
        return self._tally.snapshot(self._backend.counts())

    def _check_open(self) -> Backend:
        if self._closed:
            raise PoolClosed(f"{self!r} is shut down; start a new pool to run more tasks")
        if os.getpid() != self._pid:
            raise PoolClosed(
                f"{self!r} was made in process {self._pid}; this process is a child of "
                "os.fork(), which has none of that pool's threads or workers: make a new "
                "pool here (decorated functions called outside any `with` block use a "
                "default pool of this process's own)"
            )
        return self._backend

    def _replacement(self) -> Pool | None:
        """The default pool that replaced this one, if this one was the default."""
        return None if self._successor is None else self._successor()

    def _replacement_backend(self) -> Backend | None:
        replacement = self._replacement()
        return None if replacement is None else replacement._backend

    # -- single calls ----------------------------------------------------------------

    def spawn(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Task[R]:
        """Submit ``fn(*args, **kwargs)`` and return its :class:`Task` at once."""
        task: Task[R] = _tasks().Task()
        self._submit(fn, args, kwargs, task)
        return task

    def apply(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` on a worker and wait for its result."""
        return self._submit(fn, args, kwargs, None).outcome()  # type: ignore[no-any-return]

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        task: Task[Any] | None,
    ) -> Any:
        """Hand the call to the backend; its outcome goes to ``task``, or (None:
        a blocking call) to the ``_CallSink`` returned, for the caller to wait on."""
        if self._closed and (replacement := self._replacement()) is not None:
            return replacement._submit(fn, args, kwargs, task)
        backend = self._check_open()
        plain, options = _unwrap(fn)
        check_call(plain, args, kwargs)
        sink: Any
        if task is None:
            sink = _CallSink(backend, self._tally, self._error_hook)
        else:
            sink = _tasks().TaskSink(task, backend, self._tally, self._error_hook)
        sink.job = job = Job(plain, (args,), options, sink, kwargs=kwargs)
        self._tally.submit(1)
        # A backend may answer a blocking call on this thread (the process
        # pool talks to an idle worker directly).
        submit_and_wait = getattr(backend, "submit_and_wait", None) if task is None else None
        try:
            if submit_and_wait is not None:
                submit_and_wait(job)
            else:
                backend.submit(job)
        except PoolClosed:
            # Shut down since the check above; nothing was queued.
            if (replacement := self._replacement()) is None:
                raise
            return replacement._submit(fn, args, kwargs, task)
        except KeyboardInterrupt:
            sink.cancel()
            raise
        except BaseException:
            self._tally.withdraw(sink)
            raise
        return sink

    # -- maps ----------------------------------------------------------------------------

    def _run(
        self,
        fn: Callable[..., Any],
        items: Iterator[Item],
        star: bool,
        total: int | None,
        *,
        ordered: bool,
        chunksize: int | None,
        progress: object,
    ) -> MapRun:
        if self._closed and (replacement := self._replacement()) is not None:
            return replacement._run(
                fn, items, star, total, ordered=ordered, chunksize=chunksize, progress=progress
            )
        backend = self._check_open()
        plain, options = _unwrap(fn)
        items = _checked_first(plain, items, star)
        name = getattr(plain, "__name__", "map")
        return MapRun(
            backend,
            plain,
            options,
            items,
            star,
            total,
            ordered=ordered,
            chunksize=chunksize,
            progress=progress,
            desc=name,
            reopen=None if self._successor is None else self._replacement_backend,
            tally=self._tally,
        )

    @overload
    def map(
        self,
        fn: Callable[..., R],
        /,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        progress: object = False,
        return_exceptions: Literal[False] = False,
    ) -> list[R]: ...

    @overload
    def map(
        self,
        fn: Callable[..., R],
        /,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        progress: object = False,
        return_exceptions: bool,
    ) -> list[R | BaseException]: ...

    def map(
        self,
        fn: Callable[..., R],
        /,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        progress: object = False,
        return_exceptions: bool = False,
    ) -> list[R] | list[R | BaseException]:
        """``fn`` on every item, in parallel; a list in input order.

        Several iterables zip as in the builtin ``map``. With
        ``return_exceptions=True`` a failed item's exception stands in its
        place and every other result is kept.
        """
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        items, star = _calls(iterables)
        calls = list(items)
        return self._collect(
            fn, iter(calls), star, len(calls), chunksize, progress, return_exceptions
        )

    @overload
    def starmap(
        self,
        fn: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        /,
        *,
        chunksize: int | None = None,
        progress: object = False,
        return_exceptions: Literal[False] = False,
    ) -> list[R]: ...

    @overload
    def starmap(
        self,
        fn: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        /,
        *,
        chunksize: int | None = None,
        progress: object = False,
        return_exceptions: bool,
    ) -> list[R | BaseException]: ...

    def starmap(
        self,
        fn: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        /,
        *,
        chunksize: int | None = None,
        progress: object = False,
        return_exceptions: bool = False,
    ) -> list[R] | list[R | BaseException]:
        """``fn(*args)`` for each tuple of ``iterable``; a list in input order."""
        calls = list(map(tuple, iterable))
        return self._collect(
            fn, iter(calls), True, len(calls), chunksize, progress, return_exceptions
        )

    def _collect(
        self,
        fn: Callable[..., R],
        items: Iterator[Item],
        star: bool,
        total: int,
        chunksize: int | None,
        progress: object,
        return_exceptions: bool,
    ) -> list[Any]:
        run = self._run(
            fn, items, star, total, ordered=True, chunksize=chunksize, progress=progress
        )
        results: list[Any] = []
        for values, errors in run.chunks():
            if errors and not return_exceptions:
                raise errors[min(errors)]
            if errors:
                for k, error in errors.items():
                    values[k] = error
            results.extend(values)
        return results

    def imap(
        self,
        fn: Callable[..., R],
        /,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        progress: object = False,
    ) -> MapIterator[R]:
        """Lazy ``map``, in input order, reading input a bounded window ahead.

        An endless generator works. An item's exception is raised when the
        iteration reaches it.
        """
        return self._lazy("imap", fn, iterables, True, chunksize, progress)

    def imap_unordered(
        self,
        fn: Callable[..., R],
        /,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        progress: object = False,
    ) -> MapIterator[R]:
        """Lazy ``map`` in completion order, reading input a bounded window ahead."""
        return self._lazy("imap_unordered", fn, iterables, False, chunksize, progress)

    def _lazy(
        self,
        name: str,
        fn: Callable[..., R],
        iterables: tuple[Iterable[Any], ...],
        ordered: bool,
        chunksize: int | None,
        progress: object,
    ) -> MapIterator[R]:
        if not iterables:
            raise TypeError(f"{name}() needs at least one iterable")
        items, star = _calls(iterables)
        run = self._run(
            fn,
            items,
            star,
            _length(iterables),
            ordered=ordered,
            chunksize=chunksize,
            progress=progress,
        )
        return MapIterator(run)


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    try:
        return min(len(it) for it in iterables)  # type: ignore[arg-type]
    except TypeError:
        return None


def _checked_first(fn: Callable[..., Any], items: Iterator[Item], star: bool) -> Iterator[Item]:
    """Check the first item's arguments against ``fn``'s signature, now."""
    for first in items:
        check_call(fn, tuple(first) if star else (first,), {})
        return itertools.chain((first,), items)
    return items


def _calls(iterables: tuple[Iterable[Any], ...]) -> tuple[Iterator[Item], bool]:
    """The calls of a map over ``iterables``, and whether they are argument tuples.

    One iterable: its bare values (the cheapest to pickle); several: zipped.
    """
    if len(iterables) == 1:
        return iter(iterables[0]), False
    return zip(*iterables), True
