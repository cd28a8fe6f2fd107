"""The process pool: worker processes it owns, and one manager thread.

How a call travels::

    caller thread                       manager thread                    worker process
    -------------                       --------------                    --------------
    submit(job): pickle the arguments
      an idle worker, nothing queued:
        write Batch to its pipe ------------------------------------->  run the items,
      otherwise: append to _queue,                                      writing its status
        write a byte to the wakeup pipe ->  select() wakes on:           slot as each starts
                                             the wakeup pipe: dispatch
                                               Batch frames ------------>
                                             a worker's pipe: Results <-- Results(Done, ...)
                                               -> job.sink.deliver()
                                                  -> Task / map engine
                                             a worker's sentinel: it died
                                               -> read its status slot:
                                                  fail that one item,
                                                  requeue the rest,
                                                  start a replacement
                                             a deadline (timeout) passed:
                                               kill that worker (as above)

One duplex pipe per worker (no shared queue a dying worker could leave
locked), non-blocking on the parent's side, so the manager never blocks on a
worker. The manager blocks in ``select`` on the pipes, the sentinels and a
wakeup pipe, with the nearest timeout deadline as its only timer: it never
sleep-polls.

``_lock`` guards the queue, the workers' in-flight runs and the channels'
output buffers. Sinks are called without holding it.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing
import os
import select
import selectors
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

from ._channel import Channel
from ._errors import PoolClosed, SerializationError, TaskTimeout, WorkerCrashed
from ._procstate import (
    JobState,
    Work,
    Worker,
    can_fork_now,
    describe_exit,
    fn_name,
    load_result,
)
from ._protocol import (
    ANY_ITEM,
    Batch,
    Cancel,
    Define,
    InitFailed,
    Results,
    Run,
    decode,
    encode,
)
from ._serialize import describe_item_error, dump_function, dumps
from ._shm import release, release_leftovers, sweep_stale
from ._worker import worker_main
from .backends._base import Job, available_cpus

__all__ = ("START_METHODS", "ProcessPool", "default_start_method")

START_METHODS = ("fork", "forkserver", "spawn")

FAST_ITEM = 0.002
"""Seconds: items quicker than this are coalesced into batches, two in flight per worker."""
MAX_COALESCE = 64
JOIN_TIMEOUT = 5.0
"""Seconds a closing worker gets to exit on its own before it is killed."""

_live_pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()
_parent_fds: set[int] = set()  # guarded by _start_lock
_start_lock = threading.Lock()
"""The parent's ends of every worker pipe and wakeup pipe, of every pool."""


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


# -- the pool ---------------------------------------------------------------------


class ProcessPool:
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
    ) -> None:
        self._fork_first = start_method is None and can_fork_now()
        if start_method is None:
            start_method = default_start_method()
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
        self.workers = workers or available_cpus()
        self.start_method = start_method
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            from multiprocessing import forkserver

            if not forkserver._forkserver._forkserver_pid:  # type: ignore[attr-defined]
                self._ctx.set_forkserver_preload(["__main__", "parfn._worker"])
        self._max_tasks = max_tasks_per_worker
        # The initializer travels like any function (lambdas too); its
        # arguments as Process arguments, so that multiprocessing objects
        # (Queue, Lock, Value) can be passed by inheritance, as with
        # multiprocessing.Pool.
        self._init = None if initializer is None else dump_function(initializer)
        self._initargs = tuple(initargs)

        self._lock = threading.Lock()
        self._queue: deque[Work] = deque()
        self._workers: list[Worker] = []
        self._run_ids = itertools.count(1)
        self._fn_ids = itertools.count(1)
        self._fn_by_data: dict[bytes, int] = {}
        self._fn_data: dict[int, bytes] = {}
        self._fn_lock = threading.Lock()  # guards the function tables below
        self._fn_cache: dict[int, tuple[Any, int]] = {}  # id(fn) -> (weakref, fn_id)
        self._item_time: dict[int, float] = {}  # fn_id -> seconds per item, smoothed
        self._closed = False
        self._stopping = False
        with _start_lock:
            self._wakeup_r, self._wakeup_w = os.pipe()
            _parent_fds.update((self._wakeup_r, self._wakeup_w))
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, None)
        self._pending_failures: list[tuple[Job, int, int, Callable[[], BaseException]]] = []
        self._watching_writes = False
        self._woken = False  # a wakeup byte is in the pipe, not yet drained
        self._finished: list[tuple[Work, Any]] = []  # manager thread only
        self._dead_pids: list[int] = []  # workers that exited, for _deliver_all
        self._timed = 0  # runs in flight that have a timeout (guarded by _lock)
        sweep_stale()  # segments of processes killed before they could clean up
        self._manager = threading.Thread(target=self._manage, name="parfn-manager", daemon=True)
        _live_pools.add(self)
        _hook_exit()
        if self._fork_first:
            # The fastest safe start: this process has one thread (no lock
            # can be held by another thread across the fork), so the first
            # workers are forked now, before the manager thread exists.
            # Replacements come from the forkserver.
            with self._lock:
                for _ in range(self.workers):
                    self._start_worker("fork")
        self._manager.start()

    # -- called from any thread -------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job``; see ``backends._base``. Pickles here, in the caller."""
        works, bad = self._prepare(job)
        with self._lock:
            if self._closed:
                raise PoolClosed("the pool is shut down")
            if len(works) == 1 and not self._queue and self._send_direct(works[0]):
                if not bad and job.options.timeout is None and not self._pending_output():
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
        (work,), _ = self._prepare(job)
        with self._lock:
            if self._closed:
                raise PoolClosed("the pool is shut down")
            worker = None if self._queue else self._idle_worker()
            if worker is None:
                self._queue.append(work)
            elif self._start_work(work):
                worker.borrowed = True
                self._selector.unregister(worker.channel.fd)
                self._send(worker, [work])
            else:
                return  # cancelled before it started
        if worker is None:
            self._wake()
        else:
            self._talk(worker)

    def _prepare(self, job: Job) -> tuple[list[Work], dict[int, str]]:
        """Pickle a job (in the caller): its runs of sendable items, and why
        each other item cannot be sent."""
        if self._closed:
            raise PoolClosed("the pool is shut down")
        fn_id, _ = self._function(job.fn)
        n = len(job.items)
        try:
            data = dumps((job.star, job.kwargs, job.items), "the arguments", shm="many")
            bad: dict[int, str] = {}
        except SerializationError as exc:
            if n == 1:
                args, kwargs = job.call_args(0)
                raise SerializationError(describe_item_error(args, kwargs, exc)) from exc.__cause__
            data, bad = self._pack_good_items(job)
        state = JobState(job, fn_id, data)
        works = []
        lo = 0
        for i in [*sorted(bad), n]:
            if i > lo:
                works.append(Work(state, lo, i, job.options.retries))
            lo = i + 1
        return works, bad

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
                    for frame in frames:
                        message = decode(frame)
                        if isinstance(message, Results):
                            delivered += self._on_results(worker, message)
                        else:  # InitFailed: its runs fail with the error
                            self._on_init_failed(worker, message.error)  # type: ignore[union-attr, arg-type]
                            return
                    if eof:
                        return
                if sentinel in readable:
                    return
        finally:
            # Its results first, while the worker is still lent to this
            # thread: the manager cannot stop the pool, nor let the worker's
            # segments go, before they are loaded.
            for work, done in delivered:
                self._deliver_one(work, done)
            with self._lock:
                worker.borrowed = False
                died = worker.died
                if not died and worker in self._workers:
                    self._selector.register(channel.fd, selectors.EVENT_READ, ("pipe", worker))
            if died:
                self._on_exit(worker)
            if died or worker.retiring or self._closed or self._queue or self._pending_failures:
                self._wake()

    def cancel(self, job: Job) -> bool:
        """Stop ``job``: drop its queued items, stop its running ones. True if it was live."""
        kill: list[Worker] = []
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

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        with self._lock:
            first = not self._closed
            self._closed = True
            if cancel_pending:
                self._cancel_everything()
        self._wake()
        if not first and not cancel_pending and not wait:
            return
        if wait and threading.current_thread() is not self._manager:
            try:
                self._manager.join()
            except BaseException:
                # Ctrl-C while waiting: end what is left at once, then re-raise.
                with self._lock:
                    self._cancel_everything()
                self._wake()
                self._manager.join(JOIN_TIMEOUT * 2)
                raise

    # -- helpers for the callers' threads ----------------------------------------

    def _function(self, fn: Callable[..., Any]) -> tuple[int, bytes]:
        """The id and bytes of ``fn``, pickled once per function.

        The hot path reads ``_fn_cache`` without a lock (a dict read is atomic):
        callers must not queue behind the manager thread just to find this.
        """
        hit = self._fn_cache.get(id(fn))
        if hit is not None and hit[0]() is fn:
            return hit[1], self._fn_data[hit[1]]
        data = dump_function(fn)
        with self._fn_lock:
            fn_id = self._fn_by_data.get(data)
            if fn_id is None:
                fn_id = self._fn_by_data[data] = next(self._fn_ids)
                self._fn_data[fn_id] = data
            if len(self._fn_cache) >= 256:
                self._fn_cache = {}  # a fresh dict: readers keep the old one
            # A weak reference: the cache must not keep a bound method's
            # object alive. What cannot be weakly referenced is pickled anew.
            with contextlib.suppress(TypeError):
                self._fn_cache[id(fn)] = (weakref.ref(fn), fn_id)
        return fn_id, data

    @staticmethod
    def _pack_good_items(job: Job) -> tuple[bytes, dict[int, str]]:
        """Pickle the items that can be; say why each of the others cannot."""
        bad: dict[int, str] = {}
        items = list(job.items)
        for i in range(len(items)):
            try:
                dumps(items[i])
            except SerializationError as exc:
                bad[i] = describe_item_error(*job.call_args(i), exc)
                items[i] = ()  # a placeholder that never runs
        return dumps((job.star, job.kwargs, items), "the arguments", shm="many"), bad

    def _pending_output(self) -> bool:
        return any(w.channel.out for w in self._workers)

    def _wake(self) -> None:
        """Make the manager run its loop once more (after the caller queued work)."""
        if self._woken:
            return  # a byte is already in the pipe: one wakeup serves every caller
        self._woken = True
        try:
            os.write(self._wakeup_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    # -- dispatch (caller holds _lock) --------------------------------------------

    def _idle_worker(self) -> Worker | None:
        """A worker with nothing to do. Caller holds ``_lock``."""
        for worker in self._workers:
            if (
                worker.batches == 0
                and not worker.retiring
                and not worker.borrowed
                and worker.kill_reason is None
            ):
                return worker
        return None

    def _send_direct(self, work: Work) -> bool:
        """Write ``work`` straight to an idle worker. Caller holds ``_lock``."""
        worker = self._idle_worker()
        if worker is None:
            return False
        if self._start_work(work):
            self._send(worker, [work])
        return True

    def _start_work(self, work: Work) -> bool:
        """Tell the sink its job starts; False if it was cancelled. Caller holds ``_lock``."""
        state = work.state
        if state.cancelled:
            return False
        if not state.started:
            state.started = True
            if not state.job.sink.start():
                state.cancelled = True
                return False
        return True

    def _send(self, worker: Worker, works: list[Work]) -> None:
        """Send ``works`` to ``worker`` as one Batch. Caller holds ``_lock``."""
        frames = []
        runs = []
        for work in works:
            state = work.state
            if state.fn_id not in worker.fns:
                worker.fns.add(state.fn_id)
                frames.append(encode(Define(state.fn_id, self._fn_data[state.fn_id])))
            work.run_id = next(self._run_ids)
            worker.runs[work.run_id] = work
            if state.job.options.timeout is not None:
                self._timed += 1
            runs.append(
                Run(
                    work.run_id,
                    state.fn_id,
                    state.data,
                    work.lo,
                    work.hi,
                    work.retries,
                    state.job.options.timeout is not None,
                )
            )
        frames.append(encode(Batch(runs)))
        worker.batches += 1
        worker.channel.send(frames)

    def _dispatch(self) -> None:
        """Give queued work to workers that can take it. Caller holds ``_lock``."""
        queue = self._queue
        while queue and queue[0].state.cancelled:
            queue.popleft()
        if not queue:
            return
        # Idle workers first, then a second batch to workers running fast items.
        for depth in (0, 1):
            for worker in self._workers:
                if not queue:
                    return
                if (
                    worker.batches != depth
                    or worker.retiring
                    or worker.borrowed
                    or worker.kill_reason is not None
                ):
                    continue
                if depth == 1 and not self._is_fast(worker):
                    continue
                works = self._take(len(queue))
                if works:
                    self._send(worker, works)

    def _is_fast(self, worker: Worker) -> bool:
        return all(
            self._item_time.get(w.state.fn_id, 1.0) < FAST_ITEM for w in worker.runs.values()
        )

    def _take(self, queued: int) -> list[Work]:
        """The next batch from the queue: several fast items, or one."""
        queue = self._queue
        works: list[Work] = []
        limit = max(1, min(MAX_COALESCE, queued // max(1, 2 * len(self._workers))))
        while queue and len(works) < limit:
            work = queue[0]
            if not self._start_work(work):
                queue.popleft()
                continue
            if works and self._item_time.get(work.state.fn_id, 1.0) >= FAST_ITEM:
                break
            works.append(queue.popleft())
            if self._item_time.get(work.state.fn_id, 1.0) >= FAST_ITEM:
                break
        return works

    def _cancel_everything(self) -> None:
        """Drop the queue, kill the workers that run something. Caller holds ``_lock``."""
        queued, self._queue = self._queue, deque()
        for work in queued:
            if not work.state.cancelled:
                self._pending_failures.append((work.state.job, work.lo, work.hi, CancelledError))
        for worker in self._workers:
            if worker.runs and worker.kill_reason is None:
                worker.kill_reason = ("shutdown", 0, -1)
                worker.process.kill()
        self._stopping = True

    # -- the manager thread ---------------------------------------------------------

    def _manage(self) -> None:
        try:
            self._manage_loop()
        except BaseException as exc:  # a bug in parfn: fail everything rather than hang
            self._on_manager_error(exc)
            raise
        finally:
            self._fail_pending()
            self._selector.close()
            with _start_lock:
                _parent_fds.difference_update((self._wakeup_r, self._wakeup_w))
                os.close(self._wakeup_r)
                os.close(self._wakeup_w)

    def _on_manager_error(self, exc: BaseException) -> None:
        with self._lock:
            self._closed = self._stopping = True
            works = list(self._queue)
            self._queue.clear()
            for worker in self._workers:
                works.extend(worker.runs.values())
                worker.runs.clear()
                worker.process.kill()
            for work in works:
                self._pending_failures.append(
                    (
                        work.state.job,
                        work.lo,
                        work.hi,
                        lambda: RuntimeError(f"parfn's manager thread failed: {exc!r}"),
                    )
                )

    def _manage_loop(self) -> None:
        with self._lock:
            self._replace_workers()
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
            with self._lock:
                self._replace_workers()
                self._dispatch()  # (drops cancelled work from the queue)
                if self._closed and not self._queue:
                    self._stopping = True
                self._update_write_interest()
                if (
                    self._stopping
                    and not self._queue
                    and not any(w.runs or w.borrowed for w in self._workers)
                ):
                    break
            timeout = self._check_deadlines()
            # Outcomes go to their tasks last, just before the manager blocks:
            # a caller woken now does not wait for the GIL behind the
            # manager's bookkeeping.
            self._deliver_all()
        self._deliver_all()
        self._close_workers()

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

    def _start_worker(self, method: str | None = None) -> None:
        """Start one worker (by ``method``, default the pool's). Caller holds ``_lock``.

        Runs on the manager thread, except the first workers of a pool that
        starts them by fork (see ``can_fork_now``), started by the caller.
        """
        method = method or self.start_method
        ctx = multiprocessing.get_context(method)
        with _start_lock:  # no other pool forks while this pipe is half made
            parent_end, child_end = ctx.Pipe(duplex=True)
            slot = ctx.RawArray("d", 3)
            parent_pid = 0 if method == "forkserver" else os.getpid()
            # A forked child inherits the parent's ends of the other workers'
            # pipes; it closes them, or those workers would never see EOF.
            inherited = [*_parent_fds, parent_end.fileno()] if method == "fork" else []
            process = ctx.Process(  # type: ignore[attr-defined]
                target=worker_main,
                args=(
                    child_end,
                    slot,
                    parent_pid,
                    os.getpid(),
                    self._init,
                    self._initargs,
                    inherited,
                ),
                name="parfn-worker",
            )
            process.start()
            child_end.close()
            worker = Worker(process, Channel(parent_end), slot)
            _parent_fds.add(worker.channel.fd)
        self._workers.append(worker)
        self._selector.register(worker.channel.fd, selectors.EVENT_READ, ("pipe", worker))
        self._selector.register(process.sentinel, selectors.EVENT_READ, ("exit", worker))

    def _replace_workers(self) -> None:
        """Keep the pool at its size while it is open. Caller holds ``_lock``."""
        if self._stopping:
            return
        live = sum(1 for w in self._workers if not w.retiring)
        for _ in range(self.workers - live):
            self._start_worker()
        for worker in self._workers:
            if worker.retiring and not worker.runs and not worker.channel.out:
                # Its last item is done: closing the pipe lets it exit by itself.
                self._retire(worker)

    def _retire(self, worker: Worker) -> None:
        """Close the parent's end of the worker's pipe: it exits on EOF."""
        if worker.channel.fd >= 0:
            try:
                self._selector.unregister(worker.channel.fd)
            except (KeyError, ValueError):
                pass
            with _start_lock:
                _parent_fds.discard(worker.channel.fd)
                worker.channel.close()
            worker.channel.fd = -1

    def _update_write_interest(self) -> None:
        """Watch for writability exactly the pipes with output waiting."""
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
        for frame in frames:
            message = decode(frame)
            if isinstance(message, Results):
                self._finished += self._on_results(worker, message)
            elif isinstance(message, InitFailed):
                # Its envelope was rebuilt into the exception while decoding.
                self._on_init_failed(worker, message.error)  # type: ignore[arg-type]

    def _on_results(self, worker: Worker, message: Results) -> list[tuple[Work, Any]]:
        """Account for a worker's answer; the runs to deliver (no lock held then)."""
        delivered: list[tuple[Work, Any]] = []
        dropped: list[bytes | None] = []
        with self._lock:
            worker.batches -= 1
            for done in message.done:
                work = worker.runs.pop(done.run_id, None)
                if work is None:
                    dropped.append(done.payload)
                    continue
                if work.state.job.options.timeout is not None:
                    self._timed -= 1
                n = work.hi - work.lo
                worker.items_run += n
                if done.payload is not None and n:
                    fn_id = work.state.fn_id
                    per_item = done.elapsed / n
                    old = self._item_time.get(fn_id)
                    self._item_time[fn_id] = per_item if old is None else 0.7 * old + 0.3 * per_item
                delivered.append((work, done))
            if self._max_tasks is not None and worker.items_run >= self._max_tasks:
                worker.retiring = True
        for payload in dropped:
            release(payload)
        return delivered

    def _deliver_all(self) -> None:
        """Hand finished runs' outcomes and pending failures to their sinks."""
        # Dead workers taken before their last results: those are loaded
        # below, and then what the workers left behind is garbage.
        dead, self._dead_pids = self._dead_pids, []
        finished, self._finished = self._finished, []
        for work, done in finished:
            self._deliver_one(work, done)
        for pid in dead:
            release_leftovers(pid)
        self._fail_pending()

    def _deliver_one(self, work: Work, done: Any) -> None:
        if work.state.cancelled or done.payload is None:
            release(done.payload)
            return
        if not done.payload:
            self._isolate(work)
            return
        self._deliver(work, done.payload, done.elapsed)

    def _isolate(self, work: Work) -> None:
        """Send a run's items again one by one, each pickled alone (no lock held)."""
        state = work.state
        works = []
        for i in range(work.lo, work.hi):
            job = state.job
            data = dumps((job.star, job.kwargs, {i: job.items[i]}), shm="many")
            alone = JobState(job, state.fn_id, data)
            alone.started = True
            works.append(Work(alone, i, i + 1, work.retries))
        with self._lock:
            self._queue.extendleft(reversed(works))
        self._wake()

    def _deliver(self, work: Work, payload: bytes, elapsed: float) -> None:
        """Unpickle a run's outcomes and hand them to its sink (no lock held)."""
        job = work.state.job
        try:
            values, envelopes = load_result(payload)
        except SerializationError as exc:
            release(payload)
            if work.hi - work.lo == 1:
                job.sink.deliver(work.lo, [None], {work.lo: exc}, elapsed)
                return
            # One of the results cannot be unpickled here: run the items again
            # one by one, so that only that item fails.
            self._isolate(work)
            return
        # Ownership passes with the message: the result's segments are the
        # parent's, unlinked now; their mappings live on in ``values``.
        release(payload)
        job.sink.deliver(work.lo, values, envelopes, elapsed)

    def _on_init_failed(self, worker: Worker, error: BaseException) -> None:
        """The initializer raised: the worker's runs fail with that error."""
        with self._lock:
            works = self._take_runs(worker)
            worker.kill_reason = ("init", 0, -1)
        for work in works:
            if not work.state.cancelled:
                n = work.hi - work.lo
                work.state.job.sink.deliver(
                    work.lo, [None] * n, {i: error for i in range(work.lo, work.hi)}, 0.0
                )

    def _take_runs(self, worker: Worker) -> list[Work]:
        """Remove and return a worker's in-flight runs. Caller holds ``_lock``."""
        works = list(worker.runs.values())
        worker.runs.clear()
        self._timed -= sum(1 for w in works if w.state.job.options.timeout is not None)
        return works

    def _on_exit(self, worker: Worker) -> None:
        """A worker's process ended: account for every run it had.

        A worker lent to a caller (``_talk``) is accounted for by that caller
        when it gives the worker back.
        """
        with self._lock:
            if worker.borrowed:
                worker.died = True
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(worker.process.sentinel)
                return
        if worker.channel.fd >= 0:
            self._on_readable(worker)  # results it sent before it died still count
        process = worker.process
        process.join()
        self._dead_pids.append(process.pid)  # its leftovers go in _deliver_all
        exitcode = process.exitcode
        run_id, index, _ = worker.read_status()
        reason = worker.kill_reason
        with self._lock:
            self._workers.remove(worker)
            self._retire(worker)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(process.sentinel)
            works = [w for w in self._take_runs(worker) if not w.state.cancelled]
            failures = self._pending_failures
            requeue: list[Work] = []
            blamed = False
            for work in works:
                state = work.state
                if reason is not None and reason[0] == "shutdown":
                    failures.append((state.job, work.lo, work.hi, CancelledError))
                elif work.run_id != run_id or blamed:
                    requeue.append(work)  # it had not started
                elif index == ANY_ITEM:
                    # It died in a chunk run as one C-level loop: run the
                    # items again one by one, so that only the culprit fails.
                    blamed = True
                    requeue.extend(
                        Work(state, i, i + 1, work.retries) for i in range(work.lo, work.hi)
                    )
                else:
                    blamed = True
                    if index < work.lo:  # it died loading the run's arguments
                        lo, hi = work.lo, work.hi
                    else:
                        # Items before `index` had finished, but their results
                        # died with the worker: they run again.
                        lo, hi = index, index + 1
                        requeue.append(Work(state, work.lo, index, work.retries))
                        requeue.append(Work(state, index + 1, work.hi, work.retries))
                    error = self._blame(work, exitcode, reason, run_id, index)
                    if error is None:  # killed by us, but not for this item
                        requeue.append(Work(state, lo, hi, work.retries))
                    elif work.retries > 0:
                        requeue.append(Work(state, lo, hi, work.retries - 1))
                    else:
                        failures.append((state.job, lo, hi, error))
            if not blamed and requeue:
                # It died between items, maybe loading a message of the first
                # run it had: after three such deaths, that run fails.
                first = requeue[0]
                first.crashes += 1
                if first.crashes >= 3:
                    requeue.pop(0)
                    text = self._crash_text(first.state.job, exitcode)
                    failures.append(
                        (first.state.job, first.lo, first.hi, lambda: WorkerCrashed(text, exitcode))
                    )
            for work in reversed(requeue):
                if work.hi > work.lo:
                    self._queue.appendleft(work)
        process.close()

    def _blame(
        self,
        work: Work,
        exitcode: int | None,
        reason: tuple[str, int, int] | None,
        run_id: int,
        index: int,
    ) -> Callable[[], BaseException] | None:
        """The error for the item a dead worker was running; None: not its fault."""
        job = work.state.job
        if reason is not None:
            why, killed_run, killed_index = reason
            if (killed_run, killed_index) != (run_id, index):
                return None
            if why == "cancel":
                return CancelledError
            if why == "timeout":
                text = (
                    f"{fn_name(job)}() ran past its timeout of {job.options.timeout:g} s; "
                    "its worker was ended and replaced"
                )
                return lambda: TaskTimeout(text)
        text = self._crash_text(job, exitcode)
        if index < work.lo:
            text += " while loading the arguments"
        return lambda: WorkerCrashed(text, exitcode)

    @staticmethod
    def _crash_text(job: Job, exitcode: int | None) -> str:
        return (
            f"the worker process running {fn_name(job)}() died: "
            f"{describe_exit(exitcode)}. The worker was replaced; other tasks are unaffected"
        )

    def _fail_pending(self) -> None:
        with self._lock:
            failures, self._pending_failures = self._pending_failures, []
        for job, lo, hi, error in failures:
            job.sink.deliver(lo, [None] * (hi - lo), {i: error() for i in range(lo, hi)}, 0.0)

    # -- timeouts ---------------------------------------------------------------------

    def _deadlines(self) -> list[tuple[Worker, float, int, int]]:
        """(worker, deadline, run id, item index) for each worker with timed runs.

        For a timed run that has not started yet, the deadline is provisional
        (now + its timeout): never later than the real one will be, so the
        manager wakes in time and reads the status slot again.
        """
        out = []
        now = time.monotonic()
        with self._lock:
            for worker in self._workers:
                if worker.kill_reason is not None or not worker.runs:
                    continue
                run_id, index, started = worker.read_status()
                work = worker.runs.get(run_id)
                if work is not None and index >= work.lo:
                    timeout = work.state.job.options.timeout
                    if timeout is not None:
                        out.append((worker, started + timeout, run_id, index))
                        continue
                timeouts = [
                    w.state.job.options.timeout
                    for w in worker.runs.values()
                    if w.state.job.options.timeout is not None
                ]
                if timeouts:
                    out.append((worker, now + min(timeouts), 0, -1))
        return out

    def _check_deadlines(self) -> float | None:
        """Kill workers whose item overran; seconds until the next deadline."""
        if not self._timed:
            return None
        now = time.monotonic()
        nearest: float | None = None
        for worker, deadline, run_id, index in self._deadlines():
            if deadline <= now and run_id:
                with self._lock:
                    if worker.read_status()[:2] == (run_id, index) and worker.kill_reason is None:
                        worker.kill_reason = ("timeout", run_id, index)
                        worker.process.kill()
            elif nearest is None or deadline < nearest:
                nearest = deadline
        return None if nearest is None else max(0.0, nearest - now)

    # -- closing ------------------------------------------------------------------------

    def _close_workers(self) -> None:
        """Close every pipe (workers exit on EOF), then reap them, killing laggards."""
        with self._lock:
            workers = list(self._workers)
            for worker in workers:
                self._retire(worker)
        deadline = time.monotonic() + JOIN_TIMEOUT
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join()
            release_leftovers(worker.process.pid)  # results sent but never read
            worker.process.close()
        with self._lock:
            self._workers.clear()


_hooked = False


def _hook_exit() -> None:
    """At interpreter exit, shut down every pool still open (once registered).

    Registered when the first pool starts, after ``multiprocessing`` has
    registered its own exit handler, so this one runs first: otherwise that
    handler would wait for ever on workers whose pipes are still open.
    """
    global _hooked
    if not _hooked:
        _hooked = True
        atexit.register(shutdown_all_pools)


def shutdown_all_pools() -> None:
    """Shut down every process pool still open (at interpreter exit)."""
    for pool in list(_live_pools):
        pool.shutdown(wait=True)


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("parfn's process backend needs a POSIX system")
