"""Worker processes: how they start, are replaced, retire and are reaped.

One start model per pool, for its first workers and its replacements alike
(the user's guide, ``docs/guide/workers.md``, says what each means for the
user's code):

* ``"fork"``, the default on Linux: the pool's zygote (``_zygote``), forked
  from the caller when the pool starts, forks every worker on request. Each
  worker is a copy of the caller as it was when the pool started.
* ``"spawn"`` and ``"forkserver"``: ``multiprocessing`` starts each worker
  afresh, an interpreter that imports the main module as ``__mp_main__``.
  (``"fork"`` where there is no zygote, off Linux, too.)

Also here: the checks of the pool's options that starting a worker depends
on, and the exit hook that shuts down every pool still open when the
interpreter exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import selectors
import threading
import time
import weakref
from collections import deque

from ..._typing import Any, Protocol
from ..._wire.shm import release_leftovers
from . import _zygote
from ._channel import Channel
from ._state import PoolState, Worker, parent_fds, start_lock
from ._worker import worker_main

__all__ = (
    "JOIN_TIMEOUT",
    "START_METHODS",
    "check_initargs",
    "check_options",
    "close_workers",
    "close_zygote",
    "default_start_method",
    "open_zygote",
    "preload_forkserver",
    "register_pool",
    "replace_workers",
    "retire",
    "shutdown_all_pools",
    "start_workers",
)

START_METHODS = ("fork", "forkserver", "spawn")

JOIN_TIMEOUT = 5.0
"""Seconds a closing worker gets to exit on its own before it is killed."""


# -- the start method ---------------------------------------------------------------


def default_start_method() -> str:
    """ "fork" (by the pool's zygote) on Linux, else "spawn".

    Measured on Linux (2 cores, Python 3.11; ``docs/guide/workers.md`` has
    the table): a worker forked by the zygote starts in ~1-2 ms, first or
    replacement; by forkserver in ~10 ms once the server runs (~100 ms for
    the server itself), by spawn in ~60-100 ms. The zygote is forked once,
    from the caller, before the pool's threads exist and with no lock of
    parfn's held, and it is single-threaded: no worker is forked from a
    process whose other threads could hold a lock.
    """
    return "fork" if _zygote.available() else "spawn"


def preload_forkserver() -> None:
    """Have the forkserver, when it starts, import what every worker needs
    (and the main module, as ``multiprocessing`` does by default)."""
    import multiprocessing
    from multiprocessing import forkserver

    global _forkserver_hooked
    if not _forkserver_hooked:
        _forkserver_hooked = True
        os.register_at_fork(after_in_child=_forget_forkserver)
    if not forkserver._forkserver._forkserver_pid:  # type: ignore[attr-defined]
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["__main__", "parfn.backends.process._worker"]
        )


_forkserver_hooked = False


def _forget_forkserver() -> None:
    """In a forked child (the user's ``os.fork()``): the forkserver is the
    parent's, which the child cannot wait for; its own starts on first use.

    (``multiprocessing`` keeps the parent's, and its pools then fail there.)
    """
    from multiprocessing import forkserver

    server: Any = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        with contextlib.suppress(OSError):
            os.close(server._forkserver_alive_fd)
    server._forkserver_pid = server._forkserver_address = server._forkserver_alive_fd = None
    server._lock = threading.Lock()


# -- checks, when the pool is made ------------------------------------------------------


def check_options(start_method: str, max_tasks_per_worker: int | None, initializer: Any) -> None:
    """Raise ValueError or TypeError for an option no worker could start with."""
    if start_method != "fork" or not _zygote.available():
        import multiprocessing

        methods = multiprocessing.get_all_start_methods()
    else:
        methods = list(START_METHODS)
    if start_method not in methods:
        allowed = ", ".join(repr(m) for m in methods)
        raise ValueError(f"unknown start method {start_method!r}; choose one of {allowed}")
    if max_tasks_per_worker is not None and (
        isinstance(max_tasks_per_worker, bool)
        or not isinstance(max_tasks_per_worker, int)
        or max_tasks_per_worker < 1
    ):
        raise ValueError(
            f"max_tasks_per_worker must be an int >= 1 or None, not {max_tasks_per_worker!r}"
        )
    if initializer is not None and not callable(initializer):
        raise TypeError(f"initializer must be callable, not {initializer!r}")


class _Rehearsal:
    """Stands in for a starting ``Popen`` while ``check_initargs`` pickles.

    multiprocessing objects (Queue, Lock, Value) pickle only while a process
    starts, and pass their file descriptors through it; here the descriptors
    are only named, never sent.
    """

    @staticmethod
    def duplicate_for_child(fd: int) -> int:
        return fd

    @staticmethod
    def DupFd(fd: int) -> int:
        return fd


def check_initargs(initargs: tuple[Any, ...], start_method: str) -> None:
    """Raise TypeError now if ``initargs`` cannot reach a worker started by ``start_method``.

    A forked worker inherits them from the zygote: nothing is pickled. By
    forkserver or spawn, they are ``Process`` arguments (so that
    multiprocessing objects can be passed by inheritance), which
    multiprocessing pickles as each worker starts, on the manager thread,
    where a failure could only fail every task. So they are pickled here once
    more, as a start would pickle them (once per pool: big initargs cost one
    extra pickling).
    """
    if start_method == "fork" or not initargs:
        return
    from multiprocessing import context, reduction

    previous = context.get_spawning_popen()
    rehearsal: Any = _Rehearsal()
    context.set_spawning_popen(rehearsal)
    try:
        reduction.ForkingPickler.dumps(initargs)
    except Exception as exc:
        raise TypeError(
            f"initargs must be picklable: workers started by {start_method!r} receive them "
            f"pickled, and pickling failed: {exc}. Pass values that pickle (multiprocessing "
            f"objects made by multiprocessing.get_context({start_method!r})), or use "
            "start_method='fork', whose workers inherit initargs without pickling"
        ) from exc
    finally:
        context.set_spawning_popen(previous)


# -- starting, replacing, retiring ----------------------------------------------------


def open_zygote(pool: PoolState) -> None:
    """Fork the pool's zygote now, from this thread (``ProcessPool.__init__``,
    before the manager thread exists, holding no lock)."""
    pool._zygote = _zygote.Zygote(pool._init, pool._initargs, pool._thread_caps)


def start_workers(pool: PoolState, n: int) -> None:
    """Start ``n`` workers. Caller holds ``_lock`` (or is the only thread).

    By the zygote, all ``n`` requests go out before the first answer is read.
    """
    if pool._zygote is not None:
        for process, conn, slot in pool._zygote.fork_workers(n):
            _add(pool, Worker(process, Channel(conn), slot))
    else:
        for _ in range(n):
            _start_by_multiprocessing(pool)


def _start_by_multiprocessing(pool: PoolState) -> None:
    """Start one worker with ``multiprocessing`` (spawn, forkserver; fork off Linux)."""
    import multiprocessing

    method = pool.start_method
    ctx = multiprocessing.get_context(method)
    with start_lock:  # no other pool forks while this pipe is half made
        parent_end, child_end = ctx.Pipe(duplex=True)
        slot = ctx.RawArray("d", 3)
        parent_pid = 0 if method == "forkserver" else os.getpid()
        # A child forked by multiprocessing closes the other pools' pipes
        # (``_forksafe``), and this one's parent end here.
        own_end = [parent_end.fileno()] if method == "fork" else []
        process = ctx.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(child_end, slot, pool._init, pool._initargs),
            kwargs={
                "parent_pid": parent_pid,
                "owner_pid": os.getpid(),
                "close_fds": own_end,
                "thread_caps": pool._thread_caps,
            },
            name="parfn-worker",
        )
        process.start()
        child_end.close()
        # A plain descriptor (no finalizer: see ``_zygote.Fd``).
        conn = _zygote.Fd(os.dup(parent_end.fileno()))
        parent_end.close()
        parent_fds.add(conn.fileno())
    _add(pool, Worker(process, Channel(conn), slot))


def _add(pool: PoolState, worker: Worker) -> None:
    pool._workers.append(worker)
    pool._selector.register(worker.channel.fd, selectors.EVENT_READ, ("pipe", worker))
    pool._selector.register(worker.process.sentinel, selectors.EVENT_READ, ("exit", worker))


def replace_workers(pool: PoolState) -> None:
    """Keep the pool at its size while it is open. Caller holds ``_lock``."""
    if pool._stopping:
        return
    live = sum(1 for w in pool._workers if not w.retiring)
    want = pool.workers
    if pool.on_demand:
        idle = sum(
            1
            for w in pool._workers
            if w.batches == 0 and not w.retiring and not w.borrowed and w.kill_reason is None
        )
        want = min(want, live - idle + len(pool._queue))
    if live < want:
        try:
            start_workers(pool, want - live)
        except _zygote.ZygoteGone as exc:
            _break(pool, str(exc))
            return
    for worker in pool._workers:
        if worker.retiring and not worker.runs and not worker.channel.out:
            # Its last item is done: closing the pipe lets it exit by itself.
            retire(pool, worker)


def _break(pool: PoolState, why: str) -> None:
    """No worker can be started any more: close the pool, fail what is queued
    (the runs in flight finish on the workers that are left). Caller holds ``_lock``."""
    from ..._wire import errors

    pool._broken = why
    pool._closed = True
    queued, pool._queue = pool._queue, deque()
    for work in queued:
        if not work.state.cancelled:
            failure = (work.state.job, work.lo, work.hi, lambda: errors.WorkerCrashed(why))
            pool._pending_failures.append(failure)


def retire(pool: PoolState, worker: Worker) -> None:
    """Close the parent's end of the worker's pipe: it exits on EOF."""
    if worker.channel.fd >= 0:
        try:
            pool._selector.unregister(worker.channel.fd)
        except (KeyError, ValueError):
            pass
        with start_lock:
            parent_fds.discard(worker.channel.fd)
            worker.channel.close()
        worker.channel.fd = -1


def close_workers(pool: PoolState) -> None:
    """Close every pipe (workers exit on EOF), then reap them, killing laggards."""
    with pool._lock:
        workers = list(pool._workers)
        for worker in workers:
            retire(pool, worker)
    if pool._zygote is not None:
        pool._zygote.hang_up()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.exitcode is None:
            worker.process.kill()
            worker.process.join()
        release_leftovers(worker.process.pid)  # results sent but never read
        worker.process.close()
    with pool._lock:
        pool._workers.clear()
    close_zygote(pool)


def close_zygote(pool: PoolState) -> None:
    """Close the pool's zygote, if it has one: it exits once its workers have."""
    if pool._zygote is not None:
        pool._zygote.close()


# -- at interpreter exit --------------------------------------------------------------


class _Closable(Protocol):
    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None: ...


_live_pools: weakref.WeakSet[_Closable] = weakref.WeakSet()
_hooked = False


def register_pool(pool: _Closable) -> None:
    """Have ``pool`` shut down at interpreter exit if it is still open then.

    The hook is registered when the first pool starts, after
    ``multiprocessing`` has registered its own exit handler, so this one runs
    first: otherwise that handler would wait for ever on workers whose pipes
    are still open.
    """
    global _hooked
    _live_pools.add(pool)
    if not _hooked:
        _hooked = True
        atexit.register(shutdown_all_pools)
        # A forked child owns none of them (it cannot use them: see _forksafe).
        os.register_at_fork(after_in_child=_live_pools.clear)


def shutdown_all_pools() -> None:
    """Shut down every process pool still open (at interpreter exit)."""
    for pool in list(_live_pools):
        pool.shutdown(wait=True)
