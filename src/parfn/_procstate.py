"""What the process pool tracks: jobs, runs of their items, and workers.

Plain records (no locking of their own: the pool's ``_lock`` guards them)
and the small helpers that describe them.
"""

from __future__ import annotations

import signal
import sys
import threading
import weakref
from collections import OrderedDict
from typing import Any

from ._channel import Channel
from ._errors import SerializationError
from ._protocol import SLOT_INDEX, SLOT_JOB, SLOT_START
from ._serialize import loads
from ._shm import has_segments, release
from .backends._base import Job

__all__ = (
    "JobState",
    "Work",
    "Worker",
    "can_fork_now",
    "describe_exit",
    "fn_name",
    "load_result",
)


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


class JobState:
    """A submitted job as the pool tracks it."""

    __slots__ = ("__weakref__", "cancelled", "data", "fn_id", "job", "started")

    def __init__(self, job: Job, fn_id: int, data: bytes) -> None:
        self.job = job
        self.fn_id = fn_id
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
    __slots__ = (
        "batches",
        "borrowed",
        "channel",
        "died",
        "fns",
        "items_run",
        "kill_reason",
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
        self.fns: set[int] = set()  # function ids this worker has been sent
        self.items_run = 0
        self.retiring = False  # max_tasks_per_worker reached: no new work
        self.kill_reason: tuple[str, int, int] | None = None  # (why, run id, item index)
        self.borrowed = False  # a caller talks to it directly (see _talk)
        self.died = False  # it died while borrowed

    def read_status(self) -> tuple[int, int, float]:
        """(run id, item index, start time): a consistent snapshot."""
        status = self.status
        while True:
            first = (int(status[SLOT_JOB]), int(status[SLOT_INDEX]), status[SLOT_START])
            second = (int(status[SLOT_JOB]), int(status[SLOT_INDEX]), status[SLOT_START])
            if first == second:
                return first


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


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "it died"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        text = f"killed by {name}"
        if name == "SIGKILL":
            text += " (maybe by the out-of-memory killer: check the task's memory use)"
        elif name == "SIGSEGV":
            text += " (a segmentation fault, in native code)"
        return text
    return f"exit code {exitcode}"
