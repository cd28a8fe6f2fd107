"""DaskBackend: the Backend protocol over a Dask cluster.

One lock guards the runs: those waiting here for a slot, those in flight in
Dask (by key), and the count of items not yet delivered. The backend sends
runs, collects their outcomes on one thread, runs again the items that have
retries left, expires timed ones, cancels and shuts down. The cluster itself
is a Connection (``_cluster``); what Dask's failures mean, ``_failures``.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError
from functools import partial

from ..._typing import Any
from ..._wire.errors import PoolClosed, SerializationError
from .._base import Counts, Job
from .._replay import replay, wanted_levels
from ._cluster import Connection, Markers, check_options
from ._collector import Collector
from ._deadlines import Deadlines
from ._failures import copies, crashed, lost, read, task_error, timed_out
from ._remote import run_remote
from ._runs import FunctionPickles, Run, dump_items, key_prefix

__all__ = ("DaskBackend",)


class DaskBackend:
    """Runs Jobs on a Dask cluster: one parfn starts, one at ``address``, or ``client``'s."""

    name = "dask"
    can_stop_running = False
    chunk_seconds = 0.2
    """Map chunks hold about this much work: a Dask task costs ~10 ms to schedule."""

    def __init__(
        self,
        workers: int | None = None,
        *,
        address: str | None = None,
        client: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        start_method: str | None = None,
        max_tasks_per_worker: int | None = None,
    ) -> None:
        check_options(workers, address, client, initializer, start_method, max_tasks_per_worker)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight: dict[str, Run] = {}  # guarded by _lock, by Dask key
        self._outstanding = 0  # guarded by _lock: items submitted, not yet delivered
        self._queue: deque[Run] = deque()  # guarded by _lock: waiting for a slot
        self._running = 0  # guarded by _lock: tasks in flight in Dask
        self._closed = False  # guarded by _lock
        self._cancelling = False  # guarded by _lock
        self._released = False  # guarded by _lock: _close() ran
        self._deadlines: Deadlines | None = None  # guarded by _lock
        self._keys = itertools.count()
        self._pickles = FunctionPickles()
        # For pool.stats() (guarded by _lock): items whose worker died under
        # them, items past their timeout, runs again of items (retries).
        self._crashes = self._timed_out = self._retried = 0

        # Imports distributed, or says what to install.
        self._conn = Connection(
            workers,
            address=address,
            client=client,
            initializer=initializer,
            initargs=initargs,
            on_started=self._on_started,
        )
        self._client: Any = self._conn.client
        self._markers: Markers | None = self._conn.markers
        self._limit: int | None = self._conn.limit  # most tasks in flight; None: no limit
        self._killed_worker = self._conn.killed_worker
        self.workers: int = self._conn.workers
        self._collector = Collector(self._client, self._current, self._outcome)

    def __repr__(self) -> str:
        return f"<DaskBackend {self._client!r}>"

    # -- submitting ------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Hand ``job`` to Dask: one task, or one per item when it has a timeout."""
        with self._lock:
            if self._closed:
                raise PoolClosed("this dask pool has been shut down")
        n = len(job.items)
        if n == 1:
            # The one case where a pickling error is raised to the caller.
            run = Run(job, 0, 1, 0, self._pickles.dump(job.fn), dump_items(job, 0, 1))
            self._add_outstanding(1)
            self._launch([run])
            return
        if n == 0:
            return
        self._add_outstanding(n)
        try:
            fn_data = self._pickles.dump(job.fn)
        except SerializationError as err:
            self._fail(job, 0, n, copies(err))
            return
        if job.options.timeout is None:
            try:
                self._launch([Run(job, 0, n, 0, fn_data, dump_items(job, 0, n))])
                return
            except SerializationError:
                pass  # find the items that cannot be pickled
        self._launch_each(job, range(n), 0, fn_data)

    def _add_outstanding(self, n: int) -> None:
        with self._lock:
            self._outstanding += n

    def _settled(self, n: int) -> None:
        """``n`` items were delivered or dropped. The caller holds ``_lock``."""
        self._outstanding -= n
        if self._outstanding == 0:
            self._idle.notify_all()

    def _launch_each(self, job: Job, indexes: Iterable[int], tries: int, fn_data: bytes) -> None:
        """Launch items as one task each; an item that cannot be pickled fails alone."""
        runs = []
        for i in indexes:
            try:
                runs.append(Run(job, i, i + 1, tries, fn_data, dump_items(job, i, i + 1)))
            except SerializationError as err:
                self._fail(job, i, i + 1, copies(err))
        self._launch(runs)

    def _launch(self, runs: list[Run]) -> None:
        """Dispatch ``runs``, or queue those beyond the limit of tasks in flight."""
        ready = []
        with self._lock:
            if self._cancelling:
                cancelled, runs = runs, []
            else:
                cancelled = []
            for run in runs:
                if self._limit is None or self._running < self._limit:
                    self._running += 1
                    ready.append(run)
                else:
                    self._queue.append(run)
        for run in cancelled:
            self._fail(run.job, run.lo, run.hi, lambda i: CancelledError())
        for run in ready:
            if not self._dispatch(run):
                self._free_slot()

    def _free_slot(self) -> None:
        """A task in flight ended: dispatch the next queued run in its place."""
        while True:
            with self._lock:
                if not self._queue or self._cancelling:
                    self._running -= 1
                    return
                run = self._queue.popleft()
            if self._dispatch(run):
                return

    def _dispatch(self, run: Run) -> bool:
        """Submit ``run`` to Dask in a slot taken for it; False if it was not."""
        job = run.job
        if not job.sink.start():
            with self._lock:  # the job was cancelled: drop its items
                self._settled(run.hi - run.lo)
            return False
        run.key = f"{key_prefix(job.fn)}-{self._conn.token}-{next(self._keys)}"
        timed = job.options.timeout is not None
        with self._lock:
            cancelled = self._cancelling
            if not cancelled:
                self._inflight[run.key] = run
                if timed and self._deadlines is None:
                    self._deadlines = Deadlines(self._expire)
        if cancelled:
            self._fail(job, run.lo, run.hi, lambda i: CancelledError())
            return False
        started = (self._conn.topic, run.key) if timed else None
        marker = None if self._markers is None else self._markers.path(run.key)
        # On the cluster parfn started, its workers' loggers take this process's levels.
        levels = None if self._conn.cluster is None else wanted_levels().message
        try:
            future = self._client.submit(
                run_remote,
                run.fn_data,
                run.payload,
                started,
                marker,
                levels,
                key=run.key,
                pure=False,
            )
        except Exception as exc:
            if self._take(run):
                self._fail(job, run.lo, run.hi, copies(lost(job, exc)))
            return True
        run.future = future
        future.add_done_callback(partial(self._collector.on_done, run))
        return True

    # -- outcomes --------------------------------------------------------------

    def _take(self, run: Run) -> bool:
        """Claim ``run``'s outcome: True for exactly one of its deliverers."""
        with self._lock:
            taken = self._inflight.pop(run.key, None) is run
        if taken:
            if self._markers is not None:
                self._markers.remove(run.key)
            self._free_slot()
        return taken

    def _deliver(
        self,
        job: Job,
        lo: int,
        values: Sequence[Any],
        errors: dict[int, BaseException],
        elapsed: float,
    ) -> None:
        try:
            job.sink.deliver(lo, values, errors, elapsed)
        finally:
            with self._lock:
                self._settled(len(values))

    def _fail(self, job: Job, lo: int, hi: int, error: Callable[[int], BaseException]) -> None:
        if hi > lo:
            self._deliver(job, lo, [None] * (hi - lo), {i: error(i) for i in range(lo, hi)}, 0.0)

    def _current(self, runs: list[Run]) -> list[Run]:
        """Those of ``runs`` that are still in flight (not timed out or cancelled)."""
        with self._lock:
            return [run for run in runs if self._inflight.get(run.key) is run]

    def _outcome(self, run: Run, data: bytes | None) -> None:
        if run.future.status in ("lost", "pending"):
            # Its worker died holding the result: Dask runs it again.
            run.future.add_done_callback(partial(self._collector.on_done, run))
            return
        outcome, error = read(run.future, data)
        phase = self._phase(run) if isinstance(error, self._killed_worker) else None
        if not self._take(run):
            return  # timed out or cancelled meanwhile: delivered already
        if error is None:
            self._finished(run, outcome)
        elif phase is not None:
            self._crashed(run, error, phase)
        else:
            self._fail(run.job, run.lo, run.hi, task_error(run.job, error))

    def _finished(self, run: Run, outcome: Any) -> None:
        job, lo, hi = run.job, run.lo, run.hi
        values, raised, unsendable, elapsed, failure, split, records = outcome
        for fields in records:  # what the task logged, before its outcome
            replay(fields)
        if split and hi - lo > 1:
            # An item's arguments cannot be unpickled there: find which.
            self._launch_each(job, range(lo, hi), run.tries, run.fn_data)
            return
        if failure is not None:
            self._fail(job, lo, hi, copies(failure))
            return
        retry = sorted(raised) if run.tries < job.options.retries else []
        errors = {lo + i: e for i, e in raised.items()}
        errors.update((lo + i, e) for i, e in unsendable.items())
        if not retry:
            self._deliver(job, lo, values, errors, elapsed)
            return
        with self._lock:
            self._retried += len(retry)
        # Deliver the others; run each item that raised again, on its own.
        start = lo
        for i in [*retry, hi - lo]:
            if lo + i > start:
                part = {k: e for k, e in errors.items() if start <= k < lo + i}
                share = elapsed * (lo + i - start) / (hi - lo)
                self._deliver(job, start, values[start - lo : i], part, share)
            start = lo + i + 1
        self._launch_each(job, [lo + i for i in retry], run.tries + 1, run.fn_data)

    def _phase(self, run: Run) -> str:
        """What ``run`` was doing when its worker died, as far as the marker says:
        "queued", "load" (its arguments), "run"; "" if there are no markers."""
        return "" if self._markers is None else self._markers.phase(run.key)

    def _crashed(self, run: Run, error: BaseException, phase: str) -> None:
        """``run``'s worker died, while ``run`` was in ``phase`` (see _phase)."""
        job = run.job
        if phase == "queued":
            # Queued behind the task that killed the worker: not its fault.
            self._launch([Run(job, run.lo, run.hi, run.tries, run.fn_data, run.payload)])
            return
        if run.hi - run.lo > 1:
            # Find the item that crashed: run each again on its own.
            self._launch_each(job, range(run.lo, run.hi), run.tries, run.fn_data)
            return
        # A cluster parfn did not start may have re-run it already.
        tries = run.tries + 1 + int(getattr(error, "allowed_failures", 0) or 0)
        with self._lock:
            self._crashes += 1
        self._retry_or_fail(run, tries, lambda i: crashed(job, error, phase))

    def _retry_or_fail(self, run: Run, tries: int, error: Callable[[int], BaseException]) -> None:
        """Run the one item of ``run`` again, after ``tries`` runs of it, if its
        job's ``retries`` allow; else deliver ``error`` in its place."""
        job = run.job
        if tries <= job.options.retries:
            with self._lock:
                self._retried += 1
            self._launch_each(job, [run.lo], tries, run.fn_data)
        else:
            self._fail(job, run.lo, run.hi, error)

    # -- timeouts --------------------------------------------------------------

    def _on_started(self, event: tuple[float, Any]) -> None:
        """A worker started an item that has a timeout (on the client's event loop)."""
        key = event[1]
        with self._lock:
            run = self._inflight.get(key)
            deadlines = self._deadlines
            if run is None or run.armed or deadlines is None:
                return
            run.armed = True
        timeout = run.job.options.timeout
        assert timeout is not None
        deadlines.arm(time.monotonic() + timeout, key)

    def _expire(self, key: str) -> None:
        """An item's deadline passed (on the deadline thread)."""
        with self._lock:
            run = self._inflight.get(key)
        if run is None or not self._take(run):
            return  # it finished in time
        if run.future is not None:
            with contextlib.suppress(Exception):  # a client gone: so is its future
                run.future.cancel()
        job = run.job
        with self._lock:
            self._timed_out += 1
        self._retry_or_fail(run, run.tries + 1, lambda i: timed_out(job))

    def counts(self) -> Counts:
        """For ``pool.stats()``: runs in flight in Dask, as many as it has
        workers, count as running (the others wait in Dask's queue)."""
        with self._lock:
            return Counts(
                running=min(self._running, self.workers),
                workers=self.workers,
                crashed=self._crashes,
                timed_out=self._timed_out,
                retried=self._retried,
            )

    # -- cancelling and shutting down -----------------------------------------------

    def cancel(self, job: Job) -> bool:
        """Drop ``job``'s runs that wait here for a worker thread; on a cluster
        parfn did not start (where nothing waits here), cancel its Dask futures,
        which stops those Dask has not started yet. A running item runs on."""
        with self._lock:
            queued = [run for run in self._queue if run.job is job]
            for run in queued:
                self._queue.remove(run)
            inflight = []
            if self._limit is None:
                inflight = [run for run in self._inflight.values() if run.job is job]
                for run in inflight:
                    del self._inflight[run.key]
            dropped = sum(run.hi - run.lo for run in [*queued, *inflight])
            if dropped:
                self._settled(dropped)
        self._cancel_futures(inflight)
        for _ in inflight:
            self._free_slot()
        return bool(queued or inflight)

    def shutdown(self, wait: bool, cancel_pending: bool, terminate: bool = False) -> None:
        """Stop; close the client and LocalCluster parfn started, never a user's.

        ``cancel_pending`` drops the runs that wait here for a worker thread
        (a cluster parfn did not start has none: Dask has them all, started
        or not, and they finish); ``terminate`` cancels every run, and Dask
        tasks already running go on unobserved. Idempotent, except that a
        later call with ``cancel_pending`` or ``terminate`` still cancels what
        an earlier one left. Ctrl-C while waiting cancels what is left at once.
        """
        with self._lock:
            first, self._closed = not self._closed, True
        if not first and not cancel_pending and not terminate:
            return
        if terminate:
            self._cancel_all()
        elif cancel_pending:
            self._cancel_queued()
        cancel_pending = cancel_pending or terminate
        if wait and threading.current_thread() is self._collector.thread:
            wait = False  # called back from a delivery: waiting would wait for itself
        if not (wait or cancel_pending):
            threading.Thread(
                target=self._close_when_idle, name="parfn-dask-shutdown", daemon=True
            ).start()
            return
        try:
            self._wait_idle()
        except BaseException:
            self._cancel_all()
            self._close()
            raise
        self._close()

    def _cancel_all(self) -> None:
        """Drop every run, queued or in Dask; each item gets CancelledError."""
        with self._lock:
            self._cancelling = True
            runs = [*self._inflight.values(), *self._queue]
            self._inflight.clear()
            self._queue.clear()
        self._cancel_futures(runs)
        for run in runs:
            self._fail(run.job, run.lo, run.hi, lambda i: CancelledError())

    def _cancel_queued(self) -> None:
        """Drop the runs that wait here for a worker thread; each item gets CancelledError."""
        with self._lock:
            runs = list(self._queue)
            self._queue.clear()
        for run in runs:
            self._fail(run.job, run.lo, run.hi, lambda i: CancelledError())

    def _cancel_futures(self, runs: Iterable[Run]) -> None:
        """Cancel the Dask futures of those of ``runs`` that were submitted."""
        futures = [run.future for run in runs if run.future is not None]
        if futures:
            with contextlib.suppress(Exception):  # a client gone: so are its futures
                self._client.cancel(futures)

    def _wait_idle(self) -> None:
        with self._lock:
            while self._outstanding > 0:
                self._idle.wait()

    def _close_when_idle(self) -> None:
        self._wait_idle()
        self._close()

    def _close(self) -> None:
        """Release what parfn holds on the cluster (once, whoever calls first)."""
        with self._lock:
            if self._released:
                return
            self._released = True
            deadlines, self._deadlines = self._deadlines, None
        if deadlines is not None:
            deadlines.stop()
        self._collector.stop()
        self._conn.release()
