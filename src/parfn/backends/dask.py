"""The dask backend: Jobs run as tasks on a Dask distributed cluster.

How a job travels::

    submit(job): pickle the function and the items (an error: raised or delivered)
      |   one run per Job (a map chunk), or one per item when it has a timeout;
      |   on a LocalCluster parfn started, a run waits here for a free worker thread
      v
    _dispatch: sink.start(), client.submit(_run_remote, ..., pure=False)
      v
    Dask scheduler --> worker thread: _run_remote -> run_items -> pickled outcomes
      |                (with a timeout, first a "started" event back to the client)
      v
    Dask-Callback-Thread: _on_done queues the run for the collector
      v
    parfn-dask-collector: one gather for every run done meanwhile -> sink.deliver;
      an item that raised or whose worker died, with retries left: submitted again
    parfn-dask-deadlines: TaskTimeout at an item's deadline, armed by its "started"
      event; its Dask future is cancelled

What it guarantees, and what it does not (for the README's backend table):

* A remote exception keeps its type and the worker's traceback text; a worker
  that dies mid-task fails that item with :class:`WorkerCrashed` (from Dask's
  ``KilledWorker``) and the cluster's nanny replaces the worker.
* ``retries`` are counted here, in the caller, so an item runs at most
  ``retries + 1`` times whether it raised, crashed or timed out; except that a
  cluster parfn did not start re-runs a task whose worker died up to its own
  ``distributed.scheduler.allowed-failures`` times (default 3) before parfn
  hears of it (those runs count against ``retries``, but can exceed it), and
  that when a worker dies during a many-item chunk, its items are run again
  one by one to find the one that crashed, which so runs once more.
* On a LocalCluster parfn started, ``allowed-failures`` is 0, and a marker
  file that exists while a task runs tells parfn which of the tasks a dead
  worker held was running: the others run again, uncounted. parfn sends at
  most two tasks per worker thread to Dask and keeps the rest here, where
  they can still be cancelled (``sink.start()`` is called as a task is sent).
  On another cluster every task is sent at once, so ``cancel()`` of a task
  returns False there.
* ``timeout`` is counted from when the client hears that the item started on
  a worker (a few milliseconds after it did). At the deadline the caller gets
  :class:`TaskTimeout` and the Dask future is cancelled, but Dask cannot stop
  a running thread: the item runs on in its worker to its end, its result
  dropped. So ``can_stop_running`` is False.
* ``initializer`` runs once in each worker process (not each thread), as it
  starts or joins, through a Dask worker plugin removed again at shutdown.
* A LocalCluster started here spawns its workers, which import the main
  module: a script must make the pool under ``if __name__ == "__main__":``,
  as with Dask itself. parfn must be importable on the cluster's workers.

``distributed`` is imported only when a DaskBackend is created.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError
from functools import partial
from typing import Any

from .._errors import PoolClosed, RemoteError, SerializationError, TaskTimeout, WorkerCrashed
from .._execute import run_items
from .._serialize import (
    describe_item_error,
    dump_function,
    dumps,
    format_user_traceback,
    load_function,
    loads,
    wrap_exception,
)
from ._base import Job, available_cpus

__all__ = ("DaskBackend",)

_INSTALL = "the dask backend needs the 'distributed' package: pip install 'parfn[dask]'"


def _import_distributed() -> Any:
    try:
        import distributed  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    return distributed


def _name(fn: Callable[..., Any]) -> str:
    """How messages name a call of ``fn``: ``square()``."""
    return f"{getattr(fn, '__qualname__', None) or repr(fn)}()"


# -- in the Dask worker -------------------------------------------------------


def _run_remote(
    fn_data: bytes, payload: bytes, started: tuple[str, str] | None, marker: str | None
) -> bytes:
    """Run a run of items in a Dask worker; every outcome comes back as data.

    ``marker``: a file that exists while the task runs, which tells the
    caller, should the worker die, that this task was running (and so may be
    what killed it), and whether it was still loading its arguments ("load")
    or running the function ("run"). ``started``: ``(topic, key)`` of an
    event to send the caller first.
    """
    fd = None if marker is None else os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if fd is not None:
        os.write(fd, b"load")

    def loaded() -> None:
        if fd is not None:
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, b"run ")

    try:
        if started is not None:
            from distributed import get_worker  # type: ignore[import-not-found, unused-ignore]

            get_worker().log_event(started[0], started[1])
        return _run_here(fn_data, payload, loaded)
    finally:
        if marker is not None and fd is not None:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(marker)


_functions: dict[bytes, Callable[..., Any]] = {}
"""The functions a worker has unpickled, by their bytes (a cache; races are harmless)."""


def _load_function(data: bytes) -> Callable[..., Any]:
    fn = _functions.get(data)
    if fn is None:
        fn = load_function(data)
        if len(data) < 1 << 20:  # not a closure over big data: keep it
            if len(_functions) >= 64:
                _functions.clear()
            _functions[data] = fn
    return fn


def _run_here(fn_data: bytes, payload: bytes, loaded: Callable[[], None]) -> bytes:
    """The pickled tuple ``(values, raised, unsendable, elapsed, failure, split)``.

    ``raised`` maps an item's index in the run to the (wrapped) exception it
    raised, ``unsendable`` to the SerializationError of a result that cannot
    be pickled, and ``failure`` is an exception for every item of the run when
    they could not run at all; ``split``: the items could not be unpickled
    together, so run them one by one. Nothing escapes as a Dask task error, so
    a Dask-level error means the worker or the cluster failed, not the function.
    """
    try:
        fn = _load_function(fn_data)
    except Exception as exc:
        failure: BaseException = SerializationError(
            f"the function could not be unpickled in the Dask worker: {exc!r}"
        )
        return dumps(([], {}, {}, 0.0, wrap_exception(failure), False), "the result")
    try:
        star, kwargs, items = loads(payload, "the arguments")
    except SerializationError as exc:
        return dumps(([], {}, {}, 0.0, wrap_exception(exc), True), "the result")
    loaded()
    try:
        values, errors, elapsed = run_items(fn, items, 0, len(items), 0, star=star, kwargs=kwargs)
    except BaseException as exc:  # SystemExit and the like: must not end the caller
        failure = RemoteError(
            f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
            str(exc),
            format_user_traceback(exc),
            "it is a BaseException that ends a task rather than standing in for its result",
        )
        return dumps(([], {}, {}, 0.0, failure, False), "the result")
    raised = {i: wrap_exception(e) for i, e in errors.items()}
    try:
        return dumps((values, raised, {}, elapsed, None, False), "the result")
    except SerializationError:
        pass
    # Some result cannot be pickled: find which, and fail those items alone.
    unsendable = {}
    for i, value in enumerate(values):
        if i in raised:
            continue
        try:
            dumps(value, "the result")
        except SerializationError as err:
            values[i] = None
            unsendable[i] = wrap_exception(err)
    return dumps((values, raised, unsendable, elapsed, None, False), "the result")


_plugin_class: type | None = None


def _initializer_plugin(data: bytes) -> Any:
    """A Dask WorkerPlugin that runs a pickled ``(initializer, initargs)``.

    The class is made on first use (so that importing this module does not
    import distributed) and pickles as a call of this function.
    """
    global _plugin_class
    if _plugin_class is None:
        from distributed import WorkerPlugin  # type: ignore[import-not-found, unused-ignore]

        class InitializerPlugin(WorkerPlugin):  # type: ignore[misc, unused-ignore]
            def __init__(self, data: bytes) -> None:
                self.data = data

            def setup(self, worker: Any) -> None:
                initializer, initargs = loads(self.data, "the initializer")
                initializer(*initargs)

            def __reduce__(self) -> tuple[Any, ...]:
                return (_initializer_plugin, (self.data,))

        _plugin_class = InitializerPlugin
    return _plugin_class(data)


# -- in the caller -------------------------------------------------------------


class _Run:
    """Items ``lo:hi`` of a job as one Dask task; ``tries``: earlier runs of them."""

    __slots__ = ("armed", "fn_data", "future", "hi", "job", "key", "lo", "payload", "tries")

    def __init__(
        self, job: Job, lo: int, hi: int, tries: int, fn_data: bytes, payload: bytes
    ) -> None:
        self.job, self.lo, self.hi, self.tries = job, lo, hi, tries
        self.fn_data, self.payload = fn_data, payload
        self.key = ""
        self.future: Any = None
        self.armed = False  # its deadline is set


class _Deadlines:
    """One thread that calls ``expire(key)`` when each armed deadline passes."""

    def __init__(self, expire: Callable[[str], None]) -> None:
        self._expire = expire
        self._heap: list[tuple[float, str]] = []  # guarded by _cond
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="parfn-dask-deadlines", daemon=True)
        self._thread.start()

    def arm(self, when: float, key: str) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, key))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopped:
                    return
                _, key = heapq.heappop(self._heap)
            try:
                self._expire(key)
            except Exception:  # a bug: say so, and keep the other deadlines
                logging.getLogger("parfn").exception("expiring task %s failed", key)


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
        if start_method is not None:
            raise ValueError(
                "start_method is not an option of the dask backend: Dask starts its own "
                "worker processes (see the distributed.worker.multiprocessing-method setting)"
            )
        if max_tasks_per_worker is not None:
            raise ValueError(
                "max_tasks_per_worker is not supported by the dask backend: Dask has no "
                "per-task limit on a worker's life (see `dask worker --lifetime`)"
            )
        if address is not None and client is not None:
            raise ValueError("give the dask backend an address= or a client=, not both")
        if workers is not None and (address is not None or client is not None):
            raise ValueError(
                "workers= sets the size of the LocalCluster that parfn starts; a cluster "
                "given by address= or client= has the workers it has"
            )
        if workers is not None and (
            isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
        ):
            raise ValueError(f"workers must be an int >= 1 or None, not {workers!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {initializer!r}")
        distributed = _import_distributed()

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight: dict[str, _Run] = {}  # guarded by _lock, by Dask key
        self._outstanding = 0  # guarded by _lock: items submitted, not yet delivered
        self._queue: deque[_Run] = deque()  # guarded by _lock: waiting for a slot
        self._running = 0  # guarded by _lock: tasks in flight in Dask
        self._limit: int | None = None  # most tasks in flight; None: no limit
        self._closed = False  # guarded by _lock
        self._cancelling = False  # guarded by _lock
        self._released = False  # guarded by _lock: _close() ran
        self._done: deque[_Run] = deque()  # guarded by _done_cond: for the collector
        self._done_cond = threading.Condition()
        self._stopping = False  # guarded by _done_cond
        self._collector: threading.Thread | None = None
        self._deadlines: _Deadlines | None = None  # guarded by _lock
        self._token = uuid.uuid4().hex  # in every key, topic and plugin name of this pool
        self._keys = itertools.count()
        self._topic = f"parfn-started-{self._token}"
        self._functions: OrderedDict[int, tuple[Callable[..., Any], bytes]] = OrderedDict()
        self._plugin_name: str | None = None
        self._subscribed = False
        self._cluster: Any = None  # the LocalCluster parfn started, if any
        self._markers: str | None = None  # its directory of "task started" files
        self._owns_client = client is None

        if client is not None:
            if not isinstance(client, distributed.Client):
                raise TypeError(f"client must be a distributed.Client, not {client!r}")
            if client.asynchronous:
                raise ValueError("the dask backend needs a synchronous distributed.Client")
            self._client = client
        elif address is not None:
            self._client = distributed.Client(address, set_as_default=False)
        else:
            import dask

            # parfn counts crash retries itself, so the scheduler must not
            # silently re-run a task whose worker died. Dask then fails every
            # task the dying worker held, run or queued: a marker file tells
            # parfn which had started. At most two tasks per worker thread
            # are sent ahead; the rest wait here, where they can be cancelled.
            n = workers or available_cpus()
            self._limit = 2 * n
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                self._cluster = distributed.LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                    # No dashboard; the scheduler's small HTTP server (health,
                    # metrics) on a free port, not on 8787 where another may be.
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                )
            try:
                self._client = distributed.Client(self._cluster, set_as_default=False)
            except BaseException:
                self._cluster.close()
                raise
        try:
            if self._cluster is not None:
                self._markers = tempfile.mkdtemp(prefix="parfn-dask-")
                # removed at shutdown; also at exit, should the pool never be shut down
                weakref.finalize(self, shutil.rmtree, self._markers, ignore_errors=True)
            if initializer is not None:
                plugin = _initializer_plugin(
                    dumps((initializer, tuple(initargs)), "the initializer")
                )
                name = f"parfn-initializer-{self._token}"
                # register_plugin is distributed >= 2023.9's name for it
                register = getattr(self._client, "register_plugin", None)
                if register is None:
                    register = self._client.register_worker_plugin
                register(plugin, name=name)
                self._plugin_name = name
            self.workers: int = max(1, sum(self._client.nthreads().values()))
            # Now, so that it reaches the scheduler before any task's event.
            self._client.subscribe_topic(self._topic, self._on_started)
            self._subscribed = True
        except BaseException:
            self._close()
            raise
        self._killed_worker: type[BaseException] = distributed.KilledWorker
        self._collector = threading.Thread(
            target=self._collect, name="parfn-dask-collector", daemon=True
        )
        self._collector.start()

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
            run = _Run(job, 0, 1, 0, self._function(job.fn), self._dump_items(job, 0, 1))
            self._add_outstanding(1)
            self._launch([run])
            return
        if n == 0:
            return
        self._add_outstanding(n)
        try:
            fn_data = self._function(job.fn)
        except SerializationError as err:
            self._fail(job, 0, n, _copies(err))
            return
        if job.options.timeout is None:
            try:
                self._launch([_Run(job, 0, n, 0, fn_data, self._dump_items(job, 0, n))])
                return
            except SerializationError:
                pass  # find the items that cannot be pickled
        self._launch_each(job, range(n), 0, fn_data)

    def _add_outstanding(self, n: int) -> None:
        with self._lock:
            self._outstanding += n

    def _function(self, fn: Callable[..., Any]) -> bytes:
        """``fn`` pickled, once per function (by identity, for the last 256)."""
        key = id(fn)
        with self._lock:
            hit = self._functions.get(key)
            if hit is not None and hit[0] is fn:
                self._functions.move_to_end(key)
                return hit[1]
        data = dump_function(fn)
        with self._lock:
            self._functions[key] = (fn, data)
            if len(self._functions) > 256:
                self._functions.popitem(last=False)
        return data

    @staticmethod
    def _dump_items(job: Job, lo: int, hi: int) -> bytes:
        items = list(job.items[lo:hi])
        try:
            return dumps((job.star, job.kwargs, items), "the arguments")
        except SerializationError as err:
            if hi - lo != 1:
                raise
            args, kwargs = job.call_args(lo)
            raise SerializationError(
                describe_item_error(args, kwargs, err.__cause__ or err)
            ) from err.__cause__

    def _launch_each(self, job: Job, indexes: Iterable[int], tries: int, fn_data: bytes) -> None:
        """Launch items as one task each; an item that cannot be pickled fails alone."""
        runs = []
        for i in indexes:
            try:
                runs.append(_Run(job, i, i + 1, tries, fn_data, self._dump_items(job, i, i + 1)))
            except SerializationError as err:
                self._fail(job, i, i + 1, _copies(err))
        self._launch(runs)

    def _launch(self, runs: list[_Run]) -> None:
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

    def _dispatch(self, run: _Run) -> bool:
        """Submit ``run`` to Dask in a slot taken for it; False if it was not."""
        job = run.job
        if not job.sink.start():
            with self._lock:  # the job was cancelled: drop its items
                self._outstanding -= run.hi - run.lo
                if self._outstanding == 0:
                    self._idle.notify_all()
            return False
        run.key = f"{_key_prefix(job.fn)}-{self._token}-{next(self._keys)}"
        timed = job.options.timeout is not None
        with self._lock:
            cancelled = self._cancelling
            if not cancelled:
                self._inflight[run.key] = run
                if timed and self._deadlines is None:
                    self._deadlines = _Deadlines(self._expire)
        if cancelled:
            self._fail(job, run.lo, run.hi, lambda i: CancelledError())
            return False
        started = (self._topic, run.key) if timed else None
        marker = None if self._markers is None else os.path.join(self._markers, run.key)
        try:
            future = self._client.submit(
                _run_remote, run.fn_data, run.payload, started, marker, key=run.key, pure=False
            )
        except Exception as exc:
            if self._take(run):
                self._fail(job, run.lo, run.hi, _copies(_lost(job, exc)))
            return True
        run.future = future
        future.add_done_callback(partial(self._on_done, run))
        return True

    # -- outcomes --------------------------------------------------------------

    def _take(self, run: _Run) -> bool:
        """Claim ``run``'s outcome: True for exactly one of its deliverers."""
        with self._lock:
            taken = self._inflight.pop(run.key, None) is run
        if taken:
            if self._markers is not None:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self._markers, run.key))
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
                self._outstanding -= len(values)
                if self._outstanding == 0:
                    self._idle.notify_all()

    def _fail(self, job: Job, lo: int, hi: int, error: Callable[[int], BaseException]) -> None:
        if hi > lo:
            self._deliver(job, lo, [None] * (hi - lo), {i: error(i) for i in range(lo, hi)}, 0.0)

    def _on_done(self, run: _Run, future: Any) -> None:
        """The Dask future of ``run`` is done (on Dask's callback thread): pass it on."""
        with self._done_cond:
            self._done.append(run)
            self._done_cond.notify()

    def _collect(self) -> None:
        """The collector thread: fetch and deliver the outcomes of done runs.

        The results of all the runs done meanwhile are fetched in one
        ``gather``, so under load one round trip serves many tasks.
        """
        while True:
            with self._done_cond:
                while not self._done and not self._stopping:
                    self._done_cond.wait()
                if not self._done:
                    return
                batch = list(self._done)
                self._done.clear()
            with self._lock:
                batch = [run for run in batch if self._inflight.get(run.key) is run]
            finished = {run.key: run.future for run in batch if run.future.status == "finished"}
            data: dict[str, Any] = {}
            if finished:
                with contextlib.suppress(Exception):  # then each on its own, below
                    data = self._client.gather(finished, errors="skip")
            for run in batch:
                try:
                    self._outcome(run, data.get(run.key))
                except Exception:  # a bug: say so, and keep delivering the others
                    logging.getLogger("parfn").exception("delivering %r failed", run.job)

    def _outcome(self, run: _Run, data: bytes | None) -> None:
        job, future = run.job, run.future
        if future.status in ("lost", "pending"):
            # Its worker died holding the result: Dask runs it again.
            future.add_done_callback(partial(self._on_done, run))
            return
        outcome: Any = None
        error: BaseException | None = None
        try:
            if future.status == "finished":
                outcome = loads(data if data is not None else future.result(), "the result")
            elif future.status == "error":
                error = future.exception()
            else:
                error = CancelledError(f"Dask reports the task {future.status}")
        except BaseException as exc:
            error = exc
        with contextlib.suppress(Exception):
            future.release()
        phase = self._phase(run) if isinstance(error, self._killed_worker) else None
        if not self._take(run):
            return  # timed out or cancelled meanwhile: delivered already
        if error is None:
            self._finished(run, outcome)
        elif phase is not None:
            self._crashed(run, error, phase)
        elif isinstance(error, CancelledError):
            # Not by parfn: the client lost the scheduler, or the cluster closed.
            self._fail(job, run.lo, run.hi, lambda i: _lost(job, error))
        else:
            # Not the function (its errors are data): the worker could not run
            # the task at all (e.g. parfn is not installed there).
            self._fail(job, run.lo, run.hi, _copies(error))

    def _finished(self, run: _Run, outcome: Any) -> None:
        job, lo, hi = run.job, run.lo, run.hi
        values, raised, unsendable, elapsed, failure, split = outcome
        if split and hi - lo > 1:
            # An item's arguments cannot be unpickled there: find which.
            self._launch_each(job, range(lo, hi), run.tries, run.fn_data)
            return
        if failure is not None:
            self._fail(job, lo, hi, _copies(failure))
            return
        retry = sorted(raised) if run.tries < job.options.retries else []
        errors = {lo + i: e for i, e in raised.items()}
        errors.update((lo + i, e) for i, e in unsendable.items())
        if not retry:
            self._deliver(job, lo, values, errors, elapsed)
            return
        # Deliver the others; run each item that raised again, on its own.
        start = lo
        for i in [*retry, hi - lo]:
            if lo + i > start:
                part = {k: e for k, e in errors.items() if start <= k < lo + i}
                share = elapsed * (lo + i - start) / (hi - lo)
                self._deliver(job, start, values[start - lo : i], part, share)
            start = lo + i + 1
        self._launch_each(job, [lo + i for i in retry], run.tries + 1, run.fn_data)

    def _phase(self, run: _Run) -> str:
        """What ``run`` was doing when its worker died, as far as the marker says:
        "queued", "load" (its arguments), "run"; "" if there are no markers."""
        if self._markers is None:
            return ""
        try:
            with open(os.path.join(self._markers, run.key), "rb") as f:
                return f.read().decode().strip() or "load"
        except OSError:
            return "queued"

    def _crashed(self, run: _Run, error: BaseException, phase: str) -> None:
        """``run``'s worker died, while ``run`` was in ``phase`` (see _phase)."""
        job = run.job
        if phase == "queued":
            # Queued behind the task that killed the worker: not its fault.
            self._launch([_Run(job, run.lo, run.hi, run.tries, run.fn_data, run.payload)])
            return
        if run.hi - run.lo > 1:
            # Find the item that crashed: run each again on its own.
            self._launch_each(job, range(run.lo, run.hi), run.tries, run.fn_data)
            return
        # A cluster parfn did not start may have re-run it already.
        tries = run.tries + 1 + int(getattr(error, "allowed_failures", 0) or 0)
        if tries <= job.options.retries:
            self._launch_each(job, [run.lo], tries, run.fn_data)
            return
        doing = "loading the arguments of" if phase == "load" else "running"
        text = (
            f"the Dask worker process {doing} {_name(job.fn)} died: killed by a signal "
            "(SIGKILL: often the out-of-memory killer), os._exit, or a segfault; Dask "
            f"does not say which. {error}"
        )
        self._fail(job, run.lo, run.hi, lambda i: WorkerCrashed(text))

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
        if run.tries < job.options.retries:
            self._launch_each(job, [run.lo], run.tries + 1, run.fn_data)
            return
        text = (
            f"{_name(job.fn)} ran past its timeout of {job.options.timeout:g} s; its Dask "
            "task was cancelled, but Dask cannot stop a running task, so it goes on in "
            "its worker to the end (its result is dropped)"
        )
        self._fail(job, run.lo, run.hi, lambda i: TaskTimeout(text))

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
            self._outstanding -= dropped
            if dropped and self._outstanding == 0:
                self._idle.notify_all()
        futures = [run.future for run in inflight if run.future is not None]
        if futures:
            with contextlib.suppress(Exception):  # a client gone: so are its futures
                self._client.cancel(futures)
        for _ in inflight:
            self._free_slot()
        return bool(queued or inflight)

    def shutdown(self, wait: bool, cancel_pending: bool) -> None:
        """Stop; close the client and LocalCluster parfn started, never a user's.

        Idempotent, except that a later call with ``cancel_pending`` still
        cancels what an earlier one left running. Ctrl-C while waiting cancels
        what is left at once.
        """
        with self._lock:
            first, self._closed = not self._closed, True
        if not first and not cancel_pending:
            return
        if cancel_pending:
            self._cancel_all()
        if wait and threading.current_thread() is self._collector:
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
        futures = [run.future for run in runs if run.future is not None]
        if futures:
            with contextlib.suppress(Exception):  # a client gone: so are its futures
                self._client.cancel(futures)
        for run in runs:
            self._fail(run.job, run.lo, run.hi, lambda i: CancelledError())

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
        with self._done_cond:
            self._stopping = True
            self._done_cond.notify()
        if self._collector is not None and self._collector is not threading.current_thread():
            self._collector.join()
        client = getattr(self, "_client", None)
        if client is not None and not self._owns_client:
            # Leave the user's client as it was.
            if self._subscribed:
                with contextlib.suppress(Exception):
                    client.unsubscribe_topic(self._topic)
            if self._plugin_name is not None:
                with contextlib.suppress(Exception):
                    client.unregister_worker_plugin(self._plugin_name)
            return
        try:
            if client is not None:
                client.close()
        finally:
            if self._cluster is not None:
                self._cluster.close()
            if self._markers is not None:
                shutil.rmtree(self._markers, ignore_errors=True)


def _key_prefix(fn: Callable[..., Any]) -> str:
    """The function's name, for the task's key (Dask's dashboard groups by it)."""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "task"


def _copies(exc: BaseException) -> Callable[[int], BaseException]:
    """One exception for several items: a copy for each, so no two share a traceback."""
    first = True

    def make(i: int) -> BaseException:
        nonlocal first
        if first:
            first = False
            return exc
        try:
            other = copy.copy(exc)
        except Exception:
            return exc
        other.__cause__ = exc.__cause__
        return other

    return make


def _lost(job: Job, error: BaseException) -> BaseException:
    """The error for an item that the cluster, not the function, failed."""
    exc = WorkerCrashed(
        f"the Dask cluster could not run {_name(job.fn)}: {type(error).__name__}: {error}"
    )
    exc.__cause__ = error
    return exc
