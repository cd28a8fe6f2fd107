"""ProcessPool: the process backend's public calls, ``_talk`` and the manager loop.

The package docstring (``parfn.backends.process``) draws how a call travels.
Here: ``submit`` and ``submit_and_wait`` (the caller's side), ``cancel`` and
``shutdown``, and the manager thread, which blocks in ``select`` on the
workers' pipes, their sentinels and a wakeup pipe, with the nearest timeout
deadline as its only timer: it never sleep-polls.

``_lock`` guards the queue, the workers' in-flight runs and the channels'
output buffers (see ``PoolState``). Sinks are called without holding it.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import sys
import threading
from collections.abc import Callable

from ..._typing import Any
from ..._wire.errors import PoolClosed, SerializationError
from ..._wire.protocol import SLOT_JOB, Cancel, encode
from ..._wire.serialize import dump_function, forget_snapshot, snapshot_script
from ..._wire.shm import release_leftovers, sweep_stale
from ..._wire.threadcaps import default_threads_per_worker, thread_caps
from .._base import Counts, Job, available_cpus
from ._deaths import account_for_exit, fail_everything, fail_pending
from ._dispatch import (
    cancel_everything,
    cancel_queued,
    dispatch,
    idle_worker,
    prepare,
    send,
    send_direct,
    start_work,
)
from ._messages import read_messages
from ._oom import start_counting
from ._results import deliver_one
from ._start import (
    JOIN_TIMEOUT,
    check_initargs,
    check_options,
    close_workers,
    close_zygote,
    default_start_method,
    open_zygote,
    preload_forkserver,
    register_pool,
    replace_workers,
    start_workers,
)
from ._state import PoolState, Work, Worker
from ._timeouts import check_deadlines
from ._zygote import available as zygote_available

__all__ = ("ProcessPool",)


class ProcessPool(PoolState):
    """The "process" backend: see the module docstring."""

    name = "process"
    can_stop_running = True

    def __init__(
        self,
        workers: int | None = None,
        *,
        start_method: str | None = None,
        max_tasks_per_worker: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        start_on_demand: bool = False,
        threads_per_worker: int | None = None,
        max_memory_per_worker: int | str | None = None,
    ) -> None:
        if start_method is None:
            start_method = default_start_method()
        check_options(start_method, max_tasks_per_worker, initializer)
        initargs = () if initializer is None else tuple(initargs)
        check_initargs(initargs, start_method)
        memory_limit = None
        if max_memory_per_worker is not None:  # (_memory loads only for a limit)
            from ._memory import parse_memory_limit

            memory_limit = parse_memory_limit(max_memory_per_worker)
        _check_threads(threads_per_worker)
        # The script's functions that the workers forked by the zygote (below)
        # will have: they travel by name alone (_wire.serialize.snapshot_script).
        by_zygote = start_method == "fork" and zygote_available()
        forked_with = snapshot_script() if by_zygote else None
        # The initializer travels like any function (lambdas too); its
        # arguments are inherited by forked workers, and are Process
        # arguments otherwise, so that multiprocessing objects (Queue, Lock,
        # Value) can be passed by inheritance, as with multiprocessing.Pool.
        init = None if initializer is None else dump_function(initializer, forked_with=forked_with)
        if start_method == "forkserver":
            preload_forkserver()
        super().__init__(
            workers or available_cpus(), start_method, max_tasks_per_worker, init, initargs
        )
        self._pid = os.getpid()
        # The numerical libraries' thread pools: the variables the user has
        # not set, as this process's environment is now (_wire.threadcaps).
        self._thread_caps = thread_caps(
            threads_per_worker or default_threads_per_worker(self.workers)
        )
        self._memory_limit = memory_limit
        sweep_stale()  # segments of processes killed before they could clean up
        self.on_demand = start_on_demand
        register_pool(self)
        self._forked_with = forked_with
        if by_zygote:
            # Before the manager thread exists, from this thread, holding no
            # lock: the zygote, then the first workers (see _start, _zygote).
            # Workers that start on demand come when work calls for them.
            open_zygote(self)
            if not start_on_demand:
                start_workers(self, self.workers)
        self._manager = threading.Thread(target=self._manage, name="parfn-manager", daemon=True)
        self._manager.start()

    def _check_owner(self) -> None:
        """Raise PoolClosed in a child of the user's ``os.fork()``: the pool is the parent's."""
        if self._pid != os.getpid():
            raise PoolClosed(
                f"this process pool belongs to process {self._pid}, and this is its child "
                f"{os.getpid()} (os.fork()): a pool's workers and threads are its own process's. "
                "Start a new pool here (the default pool starts anew by itself)"
            )

    # -- called from any thread -------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job``; see ``backends._base``. Pickles here, in the caller."""
        self._check_owner()
        works, bad = prepare(self, job)
        with self._lock:
            if self._closed:
                raise PoolClosed(self._broken or "the pool is shut down")
            if len(works) == 1 and not self._queue and send_direct(self, works[0]):
                if (
                    not bad
                    and job.options.timeout is None
                    and self._memory_limit is None  # else the manager watches it
                    and not self._pending_output()
                ):
                    return
            else:
                self._queue.extend(works)
        self._wake()
        for i, text in bad.items():
            job.sink.deliver(i, [None], {i: SerializationError(text)}, 0.0)

    def submit_and_wait(self, job: Job) -> None:
        """Submit a one-item job and return once its sink has its outcome.

        When a worker is idle and nothing is queued, this thread talks to it
        directly, both ways: the request and the answer skip the manager
        thread (the manager still watches the worker's sentinel). Otherwise,
        and for a job with a timeout, the job is queued and the caller waits
        on its Task as usual.
        """
        if job.options.timeout is not None or len(job.items) != 1:
            self.submit(job)
            return
        self._check_owner()
        (work,), _ = prepare(self, job)
        with self._lock:
            if self._closed:
                raise PoolClosed(self._broken or "the pool is shut down")
            worker = None if self._queue else idle_worker(self)
            if worker is None:
                self._queue.append(work)
            elif start_work(work):
                worker.borrowed = True
                self._selector.unregister(worker.channel.fd)
                send(self, worker, [work])
            else:
                return  # cancelled before it started
        if worker is None or self._memory_limit is not None:
            self._wake()  # (with a memory limit, the manager watches the borrowed worker)
        if worker is not None:
            self._talk(worker)

    def _talk(self, worker: Worker) -> None:
        """Wait here for a borrowed worker's answer, then hand it back."""
        channel, sentinel = worker.channel, worker.process.sentinel
        delivered: list[tuple[Work, Any]] = []
        try:
            while not delivered:
                writing = [channel.fd] if channel.out else []
                readable, writable, _ = select.select([channel.fd, sentinel], writing, [])
                if writable:
                    with self._lock:
                        channel.flush()
                if channel.fd in readable:
                    frames, eof = channel.read()
                    answered, init_failed = read_messages(self, worker, frames)
                    delivered += answered
                    if eof or init_failed:
                        return
                if sentinel in readable:
                    return
        finally:
            # Its results first, while the worker is still lent to this
            # thread: the manager cannot stop the pool, nor let the worker's
            # segments go, before they are loaded.
            for work, done in delivered:
                deliver_one(self, work, done)
            with self._lock:
                worker.borrowed = False
                died = worker.died
                if died:
                    self._returned_dead.append(worker)  # for the manager to account for
                elif worker in self._workers:
                    self._selector.register(channel.fd, selectors.EVENT_READ, ("pipe", worker))
            if died or worker.retiring or self._closed or self._queue or self._pending_failures:
                self._wake()

    def cancel(self, job: Job) -> bool:
        """Stop ``job``: drop its queued items, stop its running ones. True if it was live."""
        kill: list[Worker] = []
        if self._pid != os.getpid():
            return False
        with self._lock:
            found = False
            for work in self._queue:
                if work.state.job is job:
                    work.state.cancelled = found = True
            for worker in self._workers:
                for run_id, work in worker.runs.items():
                    if work.state.job is not job:
                        continue
                    work.state.cancelled = found = True
                    running, index, _ = worker.read_status()
                    if running == run_id and worker.kill_reason is None:
                        worker.kill_reason = ("cancel", run_id, index)
                        kill.append(worker)
                    else:
                        worker.channel.send([encode(Cancel(run_id))])
        for worker in kill:
            worker.process.kill()
        if found:
            self._wake()
        return found

    def shutdown(
        self, wait: bool = True, cancel_pending: bool = False, terminate: bool = False
    ) -> None:
        """Stop; see ``backends._base``. ``cancel_pending`` drops the jobs not
        started yet; ``terminate`` also kills the workers running the others."""
        if self._pid != os.getpid():
            return  # a child of os.fork(): the parent's pool is the parent's to shut down
        with self._lock:
            first = not self._closed
            self._closed = True
            if terminate:
                cancel_everything(self)
            elif cancel_pending:
                # What a worker can take now starts (as the standard library's
                # executor moves calls to its queue before it cancels the rest).
                replace_workers(self)
                dispatch(self)
                cancel_queued(self)
        self._wake()
        if not first and not cancel_pending and not terminate and not wait:
            return
        if wait and threading.current_thread() is not self._manager:
            try:
                self._manager.join()
            except BaseException:
                # Ctrl-C while waiting: end what is left at once, then re-raise.
                with self._lock:
                    cancel_everything(self)
                self._wake()
                self._manager.join(JOIN_TIMEOUT * 2)
                raise

    def processes(self) -> list[Any]:
        """The worker processes now in service: ``multiprocessing.Process``
        objects, or the zygote's handles (``pid``, a pidfd ``sentinel``, ``kill``).

        Workers an open pool lacks are started first (those the queue calls
        for, when workers start on demand), so that the count is the one the
        caller's submissions imply. A retiring worker (``max_tasks_per_worker``
        reached) is left out. For the drop-ins' ``_processes`` and ``_pool``.
        """
        with self._lock:
            if not self._closed:
                replace_workers(self)
            return [w.process for w in self._workers if not w.retiring and not w.died]

    def counts(self) -> Counts:
        """For ``pool.stats()``: a worker runs an item while its status slot names a run."""
        with self._lock:
            workers = self._workers
            return Counts(
                running=sum(1 for w in workers if w.runs and w.status[SLOT_JOB]),
                workers=len(workers),
                restarts=self._restarts,
                crashed=self._crashed,
                timed_out=self._timed_out,
                retried=self._retried,
            )

    def _pending_output(self) -> bool:
        return any(w.channel.out for w in self._workers)

    # -- the manager thread ---------------------------------------------------------

    def _manage(self) -> None:
        try:
            self._manage_loop()
        except BaseException as exc:  # a bug in parfn: fail everything rather than hang
            fail_everything(self, exc)
            raise
        finally:
            fail_pending(self)
            self._close()
            close_zygote(self)
            forget_snapshot(self._forked_with)

    def _manage_loop(self) -> None:
        start_counting()  # the kernel's OOM kills before now are not this pool's (_oom)
        with self._lock:
            replace_workers(self)
        timeout: float | None = None
        while True:
            for key, events in self._selector.select(timeout):
                tag = key.data
                if tag is None:
                    self._drain_wakeup()
                elif tag[0] == "pipe":
                    if events & selectors.EVENT_READ:
                        self._on_readable(tag[1])
                    if events & selectors.EVENT_WRITE:
                        with self._lock:
                            tag[1].channel.flush()
                else:
                    self._on_exit(tag[1])
            if self._returned_dead:
                with self._lock:
                    returned, self._returned_dead = self._returned_dead, []
                for worker in returned:
                    self._on_exit(worker)
            with self._lock:
                replace_workers(self)
                dispatch(self)  # (drops cancelled work from the queue)
                if self._closed and not self._queue:
                    self._stopping = True
                self._update_write_interest()
                if (
                    self._stopping
                    and not self._queue
                    and not any(w.runs or w.borrowed for w in self._workers)
                ):
                    break
            timeout = check_deadlines(self)
            if self._memory_limit is not None:  # the memory watch: one timer (_memory)
                from ._memory import watch_memory

                look = watch_memory(self)
                if look is not None and (timeout is None or look < timeout):
                    timeout = look
            # Outcomes go to their tasks last, just before the manager blocks:
            # a caller woken now does not wait for the GIL behind the
            # manager's bookkeeping.
            self._deliver_all()
        self._deliver_all()
        close_workers(self)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wakeup_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        # Only now, after reading: a caller that saw the flag still set had
        # queued its work before this point, so this loop's dispatch sees it;
        # one that comes later finds the flag clear and writes a new byte.
        self._woken = False

    def _update_write_interest(self) -> None:
        """Watch for writability exactly the pipes with output waiting. Caller holds ``_lock``."""
        if not self._watching_writes and not self._pending_output():
            return
        self._watching_writes = False
        for worker in self._workers:
            fd = worker.channel.fd
            if fd < 0 or worker.borrowed:
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if worker.channel.out else 0)
            if events & selectors.EVENT_WRITE:
                self._watching_writes = True
            if self._selector.get_key(fd).events != events:
                self._selector.modify(fd, events, ("pipe", worker))

    def _on_readable(self, worker: Worker) -> None:
        frames, _eof = worker.channel.read()
        if frames:
            self._finished += read_messages(self, worker, frames)[0]

    def _on_exit(self, worker: Worker) -> None:
        """A worker's process ended: account for every run it had.

        A worker lent to a caller (``_talk``) is accounted for once that
        caller gives it back (through ``_returned_dead``).
        """
        with self._lock:
            if worker.borrowed:
                worker.died = True
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(worker.process.sentinel)
                return
        if worker.channel.fd >= 0:
            self._on_readable(worker)  # results it sent before it died still count
        account_for_exit(self, worker)

    def _deliver_all(self) -> None:
        """Hand finished runs' outcomes and pending failures to their sinks."""
        # Dead workers taken before their last results: those are loaded
        # below, and then what the workers left behind is garbage.
        dead, self._dead_pids = self._dead_pids, []
        finished, self._finished = self._finished, []
        for work, done in finished:
            deliver_one(self, work, done)
        for pid in dead:
            release_leftovers(pid)
        fail_pending(self)


def _check_threads(threads: object) -> None:
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(
            "threads_per_worker must be an int >= 1, or None for max(1, cpus // workers), "
            f"not {threads!r}"
        )


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("parfn's process backend needs a POSIX system")
