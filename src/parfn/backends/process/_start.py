"""Worker processes: how they start, are replaced, retire and are reaped.

The start method (fork first, then forkserver, by default), the checks of the
pool's options that starting a worker depends on, the bookkeeping of the
parent's pipe ends that a forked child must close, and the exit hook that
shuts down every pool still open when the interpreter exits.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import selectors
import sys
import threading
import time
import weakref
from typing import Any, Protocol

from ..._wire.shm import release_leftovers
from ._channel import Channel
from ._state import PoolState, Worker, parent_fds, start_lock
from ._worker import worker_main

__all__ = (
    "JOIN_TIMEOUT",
    "START_METHODS",
    "can_fork_now",
    "check_initargs",
    "check_options",
    "close_workers",
    "default_start_method",
    "preload_forkserver",
    "register_pool",
    "replace_workers",
    "retire",
    "shutdown_all_pools",
    "start_worker",
)

START_METHODS = ("fork", "forkserver", "spawn")

JOIN_TIMEOUT = 5.0
"""Seconds a closing worker gets to exit on its own before it is killed."""


# -- the start method ---------------------------------------------------------------


def default_start_method() -> str:
    """forkserver where the platform has it, else spawn.

    Measured on Linux (2 cores, Python 3.11): a cold start (a fresh process
    that imports parfn, gets one result and shuts down) takes ~80 ms when the
    first workers are forked, ~160 ms by forkserver (the server itself starts
    first) and ~180 ms by spawn; ``multiprocessing.Pool`` by fork takes ~40 ms.
    fork alone is not the default: the pool has a manager thread, and forking
    a process that has threads can deadlock the child (Python 3.12+ warns).
    So by default the first workers are forked while the process still has
    one thread (``can_fork_now``), and every later worker comes from the
    forkserver: as safe as spawn, a few ms per worker once the server runs,
    and Python 3.14's default on Linux.
    """
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def can_fork_now() -> bool:
    """True if forking now is safe: Linux, the main thread, the only OS thread.

    Counted by the kernel (``/proc/self/status``), so native threads (a BLAS
    pool) count too: with any other thread, fork could copy a lock it holds.
    """
    if not sys.platform.startswith("linux"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1]) == 1
    except OSError:
        pass
    return False


def preload_forkserver() -> None:
    """Have the forkserver, when it starts, import what every worker needs."""
    from multiprocessing import forkserver

    if not forkserver._forkserver._forkserver_pid:  # type: ignore[attr-defined]
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["__main__", "parfn.backends.process._worker"]
        )


# -- checks, when the pool is made ------------------------------------------------------


def check_options(start_method: str, max_tasks_per_worker: int | None, initializer: Any) -> None:
    """Raise ValueError or TypeError for an option no worker could start with."""
    if start_method not in multiprocessing.get_all_start_methods():
        allowed = ", ".join(repr(m) for m in multiprocessing.get_all_start_methods())
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

    Workers get the initializer's arguments as ``Process`` arguments (so that
    multiprocessing objects can be passed by inheritance). A forked worker
    inherits them: nothing is pickled. By forkserver or spawn (which also
    start the replacements of a pool whose first workers were forked),
    multiprocessing pickles them as each worker starts, on the manager
    thread, where a failure could only fail every task. So they are pickled
    here once more, as a start would pickle them (once per pool: big initargs
    cost one extra pickling).
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


def start_worker(pool: PoolState, method: str | None = None) -> None:
    """Start one worker (by ``method``, default the pool's). Caller holds ``_lock``.

    Runs on the manager thread, except the first workers of a pool that
    starts them by fork (see ``can_fork_now``), started by the caller.
    """
    method = method or pool.start_method
    ctx = multiprocessing.get_context(method)
    with start_lock:  # no other pool forks while this pipe is half made
        parent_end, child_end = ctx.Pipe(duplex=True)
        slot = ctx.RawArray("d", 3)
        parent_pid = 0 if method == "forkserver" else os.getpid()
        # A forked child inherits the parent's ends of the other workers'
        # pipes; it closes them, or those workers would never see EOF.
        inherited = [*parent_fds, parent_end.fileno()] if method == "fork" else []
        process = ctx.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(
                child_end,
                slot,
                parent_pid,
                os.getpid(),
                pool._init,
                pool._initargs,
                inherited,
            ),
            name="parfn-worker",
        )
        process.start()
        child_end.close()
        worker = Worker(process, Channel(parent_end), slot)
        parent_fds.add(worker.channel.fd)
    pool._workers.append(worker)
    pool._selector.register(worker.channel.fd, selectors.EVENT_READ, ("pipe", worker))
    pool._selector.register(process.sentinel, selectors.EVENT_READ, ("exit", worker))


def replace_workers(pool: PoolState) -> None:
    """Keep the pool at its size while it is open. Caller holds ``_lock``."""
    if pool._stopping:
        return
    live = sum(1 for w in pool._workers if not w.retiring)
    for _ in range(pool.workers - live):
        start_worker(pool)
    for worker in pool._workers:
        if worker.retiring and not worker.runs and not worker.channel.out:
            # Its last item is done: closing the pipe lets it exit by itself.
            retire(pool, worker)


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


def shutdown_all_pools() -> None:
    """Shut down every process pool still open (at interpreter exit)."""
    for pool in list(_live_pools):
        pool.shutdown(wait=True)
