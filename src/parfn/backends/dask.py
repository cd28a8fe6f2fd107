"""The dask backend: Jobs run as tasks on a Dask distributed cluster.

How a job travels::

    caller: submit(job) -- sink.start(), pickle the function and the items
      |
      +-- client.submit(_run_remote, ...)  one Dask task per Job (a map chunk),
      |                                    or per item when a timeout is set
      v
    Dask scheduler --> a worker thread: _run_remote -> run_items -> pickled outcomes
      |                  (with a timeout: first a "started" event to the client)
      v
    Dask-Callback-Thread: _on_done -> future.result() -> unpickle -> sink.deliver
      |  an item that raised, or whose worker died, with retries left: submitted again
      v
    parfn-dask-deadlines thread: TaskTimeout at an item's deadline, armed when
      the item's "started" event reaches the client; its future is cancelled

What it guarantees, and what it does not (the README's backend table):

* A remote exception keeps its type and the worker's traceback text; a worker
  that dies mid-task fails that item with :class:`WorkerCrashed` (Dask's
  ``KilledWorker``), and the cluster's nanny replaces the worker.
* ``retries`` are counted here, in the caller, so that an item runs at most
  ``retries + 1`` times whether it raised, crashed or timed out. Two
  exceptions: a cluster that parfn did not start re-runs a task whose worker
  died up to its own ``distributed.scheduler.allowed-failures`` times (default
  3) before parfn hears of it, and those runs count; and when a worker dies in
  the middle of a many-item chunk, the chunk's items are run again one by one
  to find the one that crashed, which therefore runs once more.
* ``timeout`` is counted from when the client hears that the item started on
  a worker (a few milliseconds after it did). At the deadline the caller gets
  :class:`TaskTimeout` and the Dask future is cancelled, but Dask cannot stop
  a running thread: the item runs on in its worker to the end (its result is
  dropped), so ``can_stop_running`` is False and ``cancel()`` of a running
  task returns False.
* ``sink.start()`` is called when a job is handed to Dask, not when a worker
  starts it, which the client does not see.
* ``initializer`` runs once in each worker process (not each thread), as the
  worker starts or joins, through a Dask worker plugin that is removed again
  at shutdown.
* A LocalCluster started here spawns its workers, which import the main
  module: a script must create the pool under ``if __name__ == "__main__":``,
  as with Dask itself. parfn must be importable on the cluster's workers.

``distributed`` is imported only when a DaskBackend is created.
"""

from __future__ import annotations

import copy
import heapq
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
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
    return getattr(fn, "__qualname__", None) or repr(fn)


# -- in the Dask worker -------------------------------------------------------


def _run_remote(fn_data: bytes, payload: bytes, started: tuple[str, str] | None) -> bytes:
    """Run a run of items in a Dask worker; every outcome comes back as data.

    Returns the pickled tuple ``(values, raised, unsendable, elapsed, failure)``:
    ``raised`` maps an item's index in the run to the (wrapped) exception it
    raised, ``unsendable`` to the SerializationError of a result that cannot
    be pickled, and ``failure`` is an exception for every item of the run when
    they could not run at all. Nothing escapes as a Dask task error, so a
    Dask-level error means the worker or the cluster failed, not the function.
    """
    if started is not None:
        from distributed import get_worker  # type: ignore[import-not-found, unused-ignore]

        get_worker().log_event(started[0], started[1])
    try:
        fn = load_function(fn_data)
    except Exception as exc:
        failure: BaseException = SerializationError(
            f"the function could not be unpickled in the Dask worker: {exc!r}"
        )
        return dumps(([], {}, {}, 0.0, wrap_exception(failure)), "the result")
    try:
        items = loads(payload, "the arguments")
    except SerializationError as exc:
        return dumps(([], {}, {}, 0.0, wrap_exception(exc)), "the result")
    try:
        values, errors, elapsed = run_items(fn, items, 0, len(items), 0)
    except BaseException as exc:  # SystemExit and the like: must not end the caller
        failure = RemoteError(
            f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
            str(exc),
            format_user_traceback(exc),
            "it is a BaseException that ends a task rather than standing in for its result",
        )
        return dumps(([], {}, {}, 0.0, failure), "the result")
    raised = {i: wrap_exception(e) for i, e in errors.items()}
    try:
        return dumps((values, raised, {}, elapsed, None), "the result")
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
    return dumps((values, raised, unsendable, elapsed, None), "the result")


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
    """Items ``lo:hi`` of a job as one Dask task; ``tries`` earlier runs of them."""

    __slots__ = ("armed", "future", "hi", "job", "key", "lo", "tries")

    def __init__(self, job: Job, lo: int, hi: int, tries: int) -> None:
        self.job, self.lo, self.hi, self.tries = job, lo, hi, tries
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
            self._expire(key)


class DaskBackend:
    """Runs Jobs on a Dask cluster: one parfn starts, one at ``address``, or ``client``'s."""

    name = "dask"
    can_stop_running = False

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
        self._closed = False  # guarded by _lock
        self._cancelling = False  # guarded by _lock
        self._deadlines: _Deadlines | None = None  # guarded by _lock
        self._topic = f"parfn-started-{uuid.uuid4().hex}"
        self._plugin_name: str | None = None
        self._subscribed = False
        self._cluster: Any = None  # the LocalCluster parfn started, if any
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
            # silently re-run a task whose worker died.
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                self._cluster = distributed.LocalCluster(
                    n_workers=workers or available_cpus(),
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    host="127.0.0.1",
                )
            try:
                self._client = distributed.Client(self._cluster, set_as_default=False)
            except BaseException:
                self._cluster.close()
                raise
        try:
            if initializer is not None:
                plugin = _initializer_plugin(
                    dumps((initializer, tuple(initargs)), "the initializer")
                )
                name = f"parfn-initializer-{uuid.uuid4().hex}"
                self._client.register_plugin(plugin, name=name)
                self._plugin_name = name
            self.workers: int = max(1, sum(self._client.nthreads().values()))
        except BaseException:
            self._close()
            raise
        self._killed_worker: type[BaseException] = distributed.KilledWorker

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
            fn_data = dump_function(job.fn)
            payload = self._dump_items(job, 0, 1)
            if not job.sink.start():
                return
            self._add_outstanding(1)
            self._launch(_Run(job, 0, 1, 0), fn_data, payload)
            return
        if not job.sink.start() or n == 0:
            return
        self._add_outstanding(n)
        try:
            fn_data = dump_function(job.fn)
        except SerializationError as err:
            self._fail(job, 0, n, lambda i: SerializationError(str(err)))
            return
        if job.options.timeout is not None:
            self._launch_each(job, 0, n, 0, fn_data)
            return
        try:
            payload = self._dump_items(job, 0, n)
        except SerializationError:
            self._launch_each(job, 0, n, 0, fn_data)
            return
        self._launch(_Run(job, 0, n, 0), fn_data, payload)

    def _add_outstanding(self, n: int) -> None:
        with self._lock:
            self._outstanding += n

    @staticmethod
    def _dump_items(job: Job, lo: int, hi: int) -> bytes:
        items = list(job.items[lo:hi])
        try:
            return dumps(items, "the arguments")
        except SerializationError as err:
            if hi - lo != 1:
                raise
            args, kwargs = items[0]
            raise SerializationError(
                describe_item_error(args, kwargs, err.__cause__ or err)
            ) from err.__cause__

    def _launch_each(self, job: Job, lo: int, hi: int, tries: int, fn_data: bytes) -> None:
        """Launch items ``lo:hi`` as one task each; one that cannot be pickled fails alone."""
        for i in range(lo, hi):
            try:
                payload = self._dump_items(job, i, i + 1)
            except SerializationError as err:
                self._fail(job, i, i + 1, _copies(err))
                continue
            self._launch(_Run(job, i, i + 1, tries), fn_data, payload)

    def _launch(self, run: _Run, fn_data: bytes, payload: bytes) -> None:
        job = run.job
        run.key = f"{_key_prefix(job.fn)}-{uuid.uuid4().hex}"
        timeout = job.options.timeout
        started = None
        with self._lock:
            cancelled = self._cancelling
            if not cancelled:
                self._inflight[run.key] = run
                if timeout is not None and self._deadlines is None:
                    self._deadlines = _Deadlines(self._expire)
                    subscribe = True
                else:
                    subscribe = False
        if cancelled:
            self._fail(job, run.lo, run.hi, lambda i: CancelledError())
            return
        if timeout is not None:
            if subscribe:
                self._client.subscribe_topic(self._topic, self._on_started)
                self._subscribed = True
            started = (self._topic, run.key)
        try:
            future = self._client.submit(
                _run_remote, fn_data, payload, started, key=run.key, pure=False
            )
        except Exception as exc:
            if self._take(run):
                self._fail(job, run.lo, run.hi, lambda i: _lost(job, exc))
            return
        run.future = future
        future.add_done_callback(partial(self._on_done, run))

    # -- outcomes --------------------------------------------------------------

    def _take(self, run: _Run) -> bool:
        """Claim ``run``'s outcome: True for exactly one of its deliverers."""
        with self._lock:
            return self._inflight.pop(run.key, None) is run

    def _deliver(
        self, job: Job, lo: int, values: Sequence[Any], errors: dict[int, BaseException],
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
        """The Dask future of ``run`` finished (on Dask's callback thread)."""
        with self._lock:
            if self._inflight.get(run.key) is not run:
                return  # timed out or cancelled: already delivered
        job = run.job
        try:
            if future.status == "finished":
                outcome = loads(future.result(), "the result")
                error = None
            elif future.status == "error":
                outcome, error = None, future.exception()
            else:
                outcome, error = None, CancelledError(f"Dask reports {future.status!r}")
        except BaseException as exc:
            outcome, error = None, exc
        future.release()
        if not self._take(run):
            return
        if error is None:
            self._finished(run, outcome)
        elif isinstance(error, self._killed_worker):
            self._crashed(run, error)
        elif isinstance(error, CancelledError):
            # Not by parfn: the client lost the scheduler, or the cluster closed.
            self._fail(job, run.lo, run.hi, lambda i: _lost(job, error))
        else:
            # Not the function (its errors are data): the worker could not run
            # the task at all (e.g. parfn is not installed there).
            self._fail(job, run.lo, run.hi, _copies(error))

    def _finished(self, run: _Run, outcome: Any) -> None:
        job, lo, hi = run.job, run.lo, run.hi
        values, raised, unsendable, elapsed, failure = outcome
        if failure is not None:
            self._fail(job, lo, hi, _copies(failure))
            return
        retry = sorted(raised) if run.tries < job.options.retries else []
        errors = {lo + i: e for i, e in raised.items()}
        errors.update((lo + i, e) for i, e in unsendable.items())
        if not retry:
            self._deliver(job, lo, values, errors, elapsed)
            return
        # Deliver the rest; run the items that raised again, each on its own.
        start = lo
        for i in [*retry, hi - lo]:
            if lo + i > start:
                part = {k: e for k, e in errors.items() if start <= k < lo + i}
                share = elapsed * (lo + i - start) / (hi - lo)
                self._deliver(job, start, values[start - lo : i], part, share)
            start = lo + i + 1
        self._relaunch(job, [lo + i for i in retry], run.tries + 1)

    def _crashed(self, run: _Run, error: BaseException) -> None:
        job = run.job
        if run.hi - run.lo > 1:
            # Find the item that crashed: run each again on its own.
            self._relaunch(job, list(range(run.lo, run.hi)), run.tries)
            return
        # A cluster parfn did not start may have re-run it already.
        tries = run.tries + 1 + int(getattr(error, "allowed_failures", 0) or 0)
        if tries <= job.options.retries:
            self._relaunch(job, [run.lo], tries)
            return
        text = (
            f"{_name(job.fn)} was running when its Dask worker process died (a signal, "
            f"os._exit, a segfault or running out of memory): {error}"
        )
        self._fail(job, run.lo, run.hi, lambda i: WorkerCrashed(text))

    def _relaunch(self, job: Job, indexes: list[int], tries: int) -> None:
        try:
            fn_data = dump_function(job.fn)
        except SerializationError as err:
            for i in indexes:
                self._fail(job, i, i + 1, lambda _: SerializationError(str(err)))
            return
        for i in indexes:
            self._launch_each(job, i, i + 1, tries, fn_data)

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
            run = self._inflight.pop(key, None)
        if run is None:
            return  # it finished in time
        if run.future is not None:
            run.future.cancel()
        job = run.job
        if run.tries < job.options.retries:
            self._relaunch(job, [run.lo], run.tries + 1)
            return
        text = (
            f"{_name(job.fn)} ran past its timeout of {job.options.timeout:g} s; its Dask "
            "task was cancelled, but Dask cannot stop a running task, so it goes on in "
            "its worker to the end (its result is dropped)"
        )
        self._fail(job, run.lo, run.hi, lambda i: TaskTimeout(text))

    # -- shutting down ---------------------------------------------------------

    def shutdown(self, wait: bool, cancel_pending: bool) -> None:
        """Stop; close the client and LocalCluster parfn started, never a user's."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            runs: list[_Run] = []
            if cancel_pending:
                self._cancelling = True
                runs = list(self._inflight.values())
                self._inflight.clear()
        if runs:
            futures = [run.future for run in runs if run.future is not None]
            try:
                self._client.cancel(futures)
            except Exception:
                pass  # the client is gone already: so are its futures
            for run in runs:
                self._fail(run.job, run.lo, run.hi, lambda i: CancelledError())
        if wait or cancel_pending:
            self._wait_idle()
            self._close()
        else:
            threading.Thread(
                target=self._close_when_idle, name="parfn-dask-shutdown", daemon=True
            ).start()

    def _wait_idle(self) -> None:
        with self._lock:
            while self._outstanding > 0:
                self._idle.wait()

    def _close_when_idle(self) -> None:
        self._wait_idle()
        self._close()

    def _close(self) -> None:
        with self._lock:
            deadlines, self._deadlines = self._deadlines, None
        if deadlines is not None:
            deadlines.stop()
        client = getattr(self, "_client", None)
        if client is not None and not self._owns_client:
            # Leave the user's client as it was.
            if self._subscribed:
                try:
                    client.unsubscribe_topic(self._topic)
                except Exception:
                    pass
            if self._plugin_name is not None:
                try:
                    client.unregister_worker_plugin(self._plugin_name)
                except Exception:
                    pass
            return
        if client is not None:
            client.close()
        if self._cluster is not None:
            self._cluster.close()


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
