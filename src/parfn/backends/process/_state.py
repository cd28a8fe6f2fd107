"""What the process pool tracks: jobs, runs of their items, workers, and the
state the pool's parts share.

Plain records (no locking of their own: ``PoolState._lock`` guards them), the
pool-wide state every module of the engine works on, and the small helpers that
describe them. The lowest of the pool's modules: it imports none of the others.
"""

from __future__ import annotations

import itertools
import os
import selectors
import signal
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable

from ..._typing import Any
from ..._wire.errors import SerializationError
from ..._wire.protocol import SLOT_INDEX, SLOT_JOB, SLOT_START
from ..._wire.serialize import dumps, loads
from ..._wire.shm import has_segments, release
from .._base import Job
from .._replay import WorkerOutput
from ._channel import Channel

__all__ = (
    "JobState",
    "PickledFunction",
    "PoolState",
    "Work",
    "Worker",
    "describe_exit",
    "dump_arguments",
    "fn_name",
    "load_result",
    "parent_fds",
    "start_lock",
)

start_lock = threading.Lock()
"""Guards ``parent_fds``; held while a worker starts, so that no pool forks
while another's pipe is half made."""

parent_fds: set[int] = set()
"""The parent's ends of every worker pipe and wakeup pipe, of every pool: a
forked worker closes them (guarded by ``start_lock``)."""


class PickledFunction:
    """A function as workers receive it: pickled once, under an id that is
    unique in this process."""

    __slots__ = ("data", "fn_id")

    def __init__(self, data: bytes) -> None:
        self.fn_id = next(_function_ids)
        self.data = data


_function_ids = itertools.count(1)


class JobState:
    """A submitted job as the pool tracks it.

    Its ``function`` travels with it: whatever the pool's bounded tables have
    forgotten meanwhile, a worker that lacks the function is sent it from here.
    """

    __slots__ = ("__weakref__", "cancelled", "data", "fn_id", "function", "job", "started")

    def __init__(self, job: Job, function: PickledFunction, data: bytes) -> None:
        self.job = job
        self.fn_id = function.fn_id
        self.function = function
        self.data = data
        self.cancelled = False
        self.started = False
        if has_segments(data):
            # Its shared-memory segments live as long as the job may still be
            # sent to a worker (again, after a crash): as long as this state.
            weakref.finalize(self, release, data).atexit = False


class Work:
    """Items ``lo:hi`` of one job: queued, or in flight on one worker as one Run."""

    __slots__ = ("crashes", "hi", "lo", "retries", "run_id", "state")

    def __init__(self, state: JobState, lo: int, hi: int, retries: int, crashes: int = 0) -> None:
        self.state = state
        self.lo = lo
        self.hi = hi
        self.retries = retries
        self.crashes = crashes
        self.run_id = 0


class Worker:
    """One worker process, its pipe and its status slot, as the pool tracks it."""

    __slots__ = (
        "batches",
        "borrowed",
        "channel",
        "died",
        "fn_bytes",
        "fns",
        "items_run",
        "items_sent",
        "kill_reason",
        "memory",
        "output",
        "process",
        "retiring",
        "runs",
        "slot",
        "status",
    )

    def __init__(self, process: Any, channel: Channel, slot: Any) -> None:
        self.process = process
        self.channel = channel
        self.slot = slot
        self.status: Any = memoryview(slot).cast("B").cast("d")  # float64 slots
        self.runs: OrderedDict[int, Work] = OrderedDict()  # in flight, in send order
        self.batches = 0  # Batch frames sent and not yet answered
        # The function ids it holds, least recently used first, and the size of
        # each one's pickled data (see _dispatch.send).
        self.fns: OrderedDict[int, int] = OrderedDict()
        self.fn_bytes = 0  # their sizes, added up
        self.items_run = 0
        self.items_sent = 0  # items of every run sent to it (max_tasks_per_worker counts these)
        self.retiring = False  # max_tasks_per_worker reached: no new work
        self.kill_reason: tuple[str, int, int] | None = None  # (why, run id, item index)
        self.borrowed = False  # a caller talks to it directly (see _talk)
        self.died = False  # it died while borrowed
        self.memory: Any = None  # what the memory watch knows of it (_memory.Seen)
        self.output = WorkerOutput()  # its prints, being assembled into lines

    def read_status(self) -> tuple[int, int, float]:
        """(run id, item index, start time): a consistent snapshot."""
        status = self.status
        while True:
            first = (int(status[SLOT_JOB]), int(status[SLOT_INDEX]), status[SLOT_START])
            second = (int(status[SLOT_JOB]), int(status[SLOT_INDEX]), status[SLOT_START])
            if first == second:
                return first


class PoolState:
    """The state a process pool's parts share; ``ProcessPool`` extends it.

    ``on_demand``: start a worker only when queued work finds none idle (as
    ``concurrent.futures`` does), up to ``workers``; else keep all running.

    The pool's other modules (``_start``, ``_dispatch``,
    ``_results``, ``_deaths``, ``_timeouts``) are free functions
    over this state, so that the hot paths read plain attributes of one object.

    ``_lock`` guards the queue, the workers (their in-flight runs and their
    channels' output buffers), the selector's registrations,
    ``_pending_failures``, ``_timed`` and ``_item_time``; sinks are called
    without holding it. A function that needs it held says "caller holds
    ``_lock``". ``_fn_lock`` guards the function tables, which keep the most
    recent functions only (the hot path reads ``_fn_cache`` without it).
    ``_finished`` and ``_dead_pids`` belong to the manager thread alone: a
    caller that gives back a borrowed worker that died puts it in
    ``_returned_dead`` (under ``_lock``), for the manager to account for.
    """

    on_demand = False

    def __init__(
        self,
        workers: int,
        start_method: str,
        max_tasks: int | None,
        init: bytes | None,
        initargs: tuple[Any, ...],
    ) -> None:
        self.workers = workers
        self.start_method = start_method
        self._max_tasks = max_tasks
        self._init = init  # the pickled initializer
        self._initargs = initargs  # Process arguments (multiprocessing pickles them)
        self._zygote: Any = None  # the zygote that forks the workers (fork), see _start
        # The token of the snapshot of the script's functions that the workers
        # have by fork: they travel by name alone (_wire.serialize.snapshot_script).
        self._forked_with: int | None = None
        self._broken: str | None = None  # why no worker can be started any more

        self._lock = threading.Lock()
        self._queue: deque[Work] = deque()
        self._workers: list[Worker] = []
        self._run_ids = itertools.count(1)
        self._fn_lock = threading.Lock()  # guards the function tables below
        # Pickled bytes -> function, least recently pickled first: equal
        # functions (a closure made anew over the same values) share one id.
        self._fn_by_data: OrderedDict[bytes, PickledFunction] = OrderedDict()
        self._fn_bytes = 0  # the sizes of the keys of _fn_by_data, added up
        self._fn_cache: dict[int, tuple[Any, PickledFunction]] = {}  # id(fn) -> (weakref, it)
        self._item_time: dict[int, float] = {}  # fn_id -> seconds per item, smoothed
        self._closed = False
        self._stopping = False
        with start_lock:
            self._wakeup_r, self._wakeup_w = os.pipe()
            parent_fds.update((self._wakeup_r, self._wakeup_w))
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, None)
        self._pending_failures: list[tuple[Job, int, int, Callable[[], BaseException]]] = []
        self._watching_writes = False
        self._woken = False  # a wakeup byte is in the pipe, not yet drained
        self._finished: list[tuple[Work, Any]] = []  # runs to deliver, for _deliver_all
        self._dead_pids: list[int] = []  # workers that exited, for _deliver_all
        self._returned_dead: list[Any] = []  # borrowed workers that died (guarded by _lock)
        self._timed = 0  # runs in flight that have a timeout (guarded by _lock)
        self._thread_caps: dict[str, str] = {}  # set in each worker (_wire.threadcaps)
        self._memory_limit: int | None = None  # max_memory_per_worker, bytes (_memory)
        self._memory_look = 0.0  # when the manager looks at busy workers' memory next
        # For pool.stats() (guarded by _lock): items whose worker died under
        # them, items that ran past their timeout, runs again, workers replaced.
        self._crashed = self._timed_out = self._retried = self._restarts = 0

    def _wake(self) -> None:
        """Make the manager run its loop once more (after the caller queued work)."""
        if self._woken:
            return  # a byte is already in the pipe: one wakeup serves every caller
        self._woken = True
        try:
            os.write(self._wakeup_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    def _close(self) -> None:
        """Close the selector and the wakeup pipe (the manager thread, as it ends)."""
        self._selector.close()
        with start_lock:
            parent_fds.difference_update((self._wakeup_r, self._wakeup_w))
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)


def dump_arguments(pool: PoolState, obj: Any, what: str = "the value", shm: Any = None) -> bytes:
    """Pickle arguments for the pool's workers, whose ``__main__`` is the
    script: its functions and classes go by name (into the snapshot the
    workers were forked after, if any), as ``multiprocessing`` sends them."""
    return dumps(obj, what, shm=shm, to_script=True, forked_with=pool._forked_with)


def load_result(payload: bytes) -> Any:
    """Unpickle a worker's answer; whatever unpickling raises (SystemExit
    included) becomes a SerializationError of the runs it carries."""
    try:
        return loads(payload, "the result")
    except KeyboardInterrupt:
        raise
    except SerializationError:
        raise
    except BaseException as exc:
        raise SerializationError(f"the result could not be unpickled here: {exc!r}") from exc


def fn_name(job: Job) -> str:
    return getattr(job.fn, "__qualname__", None) or repr(job.fn)


def describe_exit(exitcode: int | None, oom: bool | None = None) -> str:
    """How a worker ended; ``oom``: whether the kernel's OOM killer killed it
    (None: nobody can tell; see ``_oom``)."""
    if exitcode is None:
        return "it died"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        text = f"killed by {name}"
        if name == "SIGKILL" and oom:
            text = (
                "killed by the kernel's out-of-memory killer (SIGKILL; its cgroup's oom_kill "
                "count went up): the machine or its cgroup ran out of memory"
            )
        elif name == "SIGKILL" and oom is None:
            text += " (maybe by the out-of-memory killer: check the task's memory use)"
        elif name == "SIGKILL":
            text += " (not by the out-of-memory killer: its cgroup's oom_kill count is unchanged)"
        elif name == "SIGSEGV":
            text += " (a segmentation fault, in native code)"
        return text
    return f"exit code {exitcode}"
