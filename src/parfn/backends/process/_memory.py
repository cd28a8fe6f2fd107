"""Memory: the workers' memory against the pool's ``max_memory_per_worker``.

Two checks, both in the parent, and only when the pool has a limit:

* after a task: when a worker's Results arrive, its memory is read; above the
  limit, the worker retires (the task's result is kept; it takes no new work
  and exits once its last run is done, and a new worker takes its place);
* during a task: the manager thread looks at every busy worker's memory with
  one timer (``watch_memory``, beside the timeout deadlines). A worker seen
  above the limit twice in a row while running the same item is killed; that
  item fails with ``MemoryLimitExceeded``, and its other runs go back to the
  queue.

What is measured is a worker's own resident memory: its resident set
(``/proc/<pid>/statm``, ~7 us to read), less, when that is above the limit,
the pages it shares with other processes (``own_memory``): a worker forked
from a caller that holds a big array maps the caller's pages too, shared
copy-on-write, and they are not its own; a limit on the resident set would
recycle every such worker after every task.

The timer's period, measured on this project's 2-core machine: numpy fills
fresh memory at ~4 GiB/s (``np.ones``), so between two looks ``PERIOD``
apart a fast allocator gets up to ~400 MiB past the limit. The next look at
a worker is therefore sooner the closer it is to the limit: the time it
would take to reach it at that speed, between ``MIN_PERIOD`` and ``PERIOD``;
and a worker seen over it is looked at again ``MIN_PERIOD`` later. Measured
(2 busy workers, 20 s): the manager thread used 0.15% of a CPU with the
workers far below the limit, 1.1% with both within 10 MiB of it (a look
every 10 ms), 2.6% when they were also forked from a 400 MiB caller (their
shared pages read again, see ``own_memory``); nothing while no worker is
busy or no limit is set. A 2 GiB ``np.ones`` against a 500 MiB limit was
stopped seen at 504 to 526 MiB (5 runs). Memory allocated faster than it is
seen is the kernel's to stop (a cgroup limit, the OOM killer; see ``_oom``).

Needs Linux's ``/proc``: elsewhere a limit is refused when the pool is made.
"""

from __future__ import annotations

import os
import re
import time

from ..._wire import errors
from .._base import Job
from ._state import PoolState, Worker, fn_name

__all__ = (
    "FAST_ALLOCATION",
    "MIN_PERIOD",
    "PERIOD",
    "SMAPS_SHARE",
    "Seen",
    "format_bytes",
    "memory_error",
    "own_memory",
    "parse_memory_limit",
    "private",
    "recycle_if_over",
    "resident",
    "watch_memory",
)

PERIOD = 0.1
"""Seconds between two looks at a busy worker far below the limit."""
MIN_PERIOD = 0.01
"""Seconds between two looks at a busy worker close to the limit."""
FAST_ALLOCATION = 4 * 2**30
"""Bytes per second a fast allocator fills (numpy's ``np.ones``, measured here)."""
SMAPS_SHARE = 100
"""Read a worker's shared pages again after this many times the last read's time."""

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_memory_limit(value: object) -> int | None:
    """``max_memory_per_worker`` in bytes: an int of bytes, or a string such as "512MiB".

    Units: B, KB/MB/GB/TB (powers of 1000; K/M/G/T alone too, as in Dask),
    KiB/MiB/GiB/TiB (powers of 1024), in any case, with or without a space.

    >>> parse_memory_limit("512MiB"), parse_memory_limit("2GB"), parse_memory_limit(4096)
    (536870912, 2000000000, 4096)
    >>> parse_memory_limit("lots")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: max_memory_per_worker must be ... such as '512MiB' or '2GB', not 'lots'
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(
            "max_memory_per_worker must be an int of bytes or a string such as '512MiB', "
            f"not {type(value).__name__} {value!r}"
        )
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        unit = _UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            raise ValueError(
                "max_memory_per_worker must be a number of bytes or a size such as '512MiB' "
                f"or '2GB', not {value!r}"
            )
        size = int(float(match.group(1)) * unit)
    else:
        size = value
    if size < 1:
        raise ValueError(f"max_memory_per_worker must be above 0 bytes, not {value!r}")
    if not os.path.exists("/proc/self/statm"):
        raise NotImplementedError(
            "max_memory_per_worker needs Linux's /proc to read the workers' memory"
        )
    return size


def format_bytes(size: int) -> str:
    """``size`` bytes, readably, in powers of 1024.

    >>> format_bytes(536870912), format_bytes(1536 * 2**20), format_bytes(999)
    ('512 MiB', '1.5 GiB', '999 B')
    """
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.4g} {unit}"
    return f"{size} B"


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Seen:
    """What the memory watch knows of one worker (``Worker.memory``)."""

    __slots__ = ("item", "over", "shared", "shared_next")

    def __init__(self) -> None:
        self.shared = 0  # bytes of its resident set that are not its own, as last read
        self.shared_next = 0.0  # when to read that again (smaps_rollup)
        self.over = 0  # bytes, when it was found over the limit (0: never)
        self.item: tuple[int, int] | None = None  # (run id, item) it was first seen over in


def resident(pid: int) -> int | None:
    """The resident set of process ``pid``, in bytes; None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def private(pid: int) -> int | None:
    """The resident pages of ``pid`` that no other process maps, in bytes."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            rollup = f.read()
    except OSError:
        return None  # gone, or Linux before 4.14
    lines = rollup.splitlines()
    return sum(int(line.split()[1]) for line in lines if line.startswith(b"Private_")) * 1024


def own_memory(worker: Worker, limit: int, now: float) -> int | None:
    """The worker's own resident memory, in bytes; None if it is gone.

    Its resident set while that is below the limit. Above it, the pages it
    shares with other processes do not count. Reading which those are
    (``smaps_rollup``) walks the worker's page tables: ~6 ms for a worker
    forked from a process of 400 MiB, more for bigger ones. So they are read
    again only when the resident set less the shared pages last read is
    above the limit, or after ``SMAPS_SHARE`` times as long as the last
    read took (at least ``PERIOD``): at most ~1% of a CPU per worker. (A
    worker that writes to pages it shares, copy-on-write, with its parent
    makes them its own without growing its resident set: that is seen at the
    next read.)
    """
    seen: Seen | None = worker.memory
    if seen is None:
        seen = worker.memory = Seen()
    rss = resident(worker.process.pid)
    if rss is None or rss <= limit:
        return rss
    estimate = rss - seen.shared
    if estimate <= limit and now < seen.shared_next:
        return estimate
    own = private(worker.process.pid)
    if own is None:
        return rss
    took = time.monotonic() - now
    seen.shared, seen.shared_next = rss - own, now + max(PERIOD, SMAPS_SHARE * took)
    return own


def recycle_if_over(pool: PoolState, worker: Worker) -> None:
    """After a task: retire ``worker`` if it is above the limit. Takes ``_lock``."""
    limit = pool._memory_limit
    if limit is None or worker.retiring:
        return
    seen = own_memory(worker, limit, time.monotonic())
    if seen is not None and seen > limit:
        with pool._lock:
            worker.retiring = True
            worker.memory.over = seen


def watch_memory(pool: PoolState) -> float | None:
    """Look at the busy workers' memory if it is time; seconds until the next look.

    None while no worker is busy (or the pool has no limit): no timer then.
    Manager thread; takes ``_lock``.
    """
    limit = pool._memory_limit
    if limit is None:
        return None
    now = time.monotonic()
    with pool._lock:
        busy = [w for w in pool._workers if w.runs and w.kill_reason is None]
    if not busy:
        pool._memory_look = 0.0
        return None
    if now < pool._memory_look:
        return pool._memory_look - now
    delay = PERIOD
    for worker in busy:
        seen = own_memory(worker, limit, now)
        if seen is None:
            continue  # it just died: its sentinel says so
        if seen > limit:
            if _over(pool, worker, seen):
                delay = MIN_PERIOD
        else:
            worker.memory.item = None
            delay = min(delay, max(MIN_PERIOD, (limit - seen) / FAST_ALLOCATION))
    pool._memory_look = now + delay
    return delay


def _over(pool: PoolState, worker: Worker, seen: int) -> bool:
    """A busy worker is above the limit. True: look again soon, to confirm.

    The item it runs fails if it is still running, still above the limit, at
    the next look (``MIN_PERIOD`` later): an item that went over and ended
    just after (a leak's last allocation) leaves a worker to recycle, and no
    error. A worker that was above the limit before its run began (it is
    retiring for that) is killed with no blame: its runs go back to the queue.
    """
    memory = worker.memory
    with pool._lock:
        if worker.kill_reason is not None or worker not in pool._workers:
            return False
        run_id, index, _ = worker.read_status()
        if not run_id:
            # Between two runs: recycled, as after a task.
            worker.retiring, memory.over = True, seen
            return False
        if worker.retiring and memory.over:
            worker.kill_reason = ("recycle", run_id, -2)
        elif memory.item != (run_id, index):
            memory.item = (run_id, index)  # seen once: confirm at the next look
            return True
        else:
            worker.kill_reason = ("memory", run_id, index)
            memory.over = seen
        worker.process.kill()
    return False


def memory_error(
    job: Job, limit: int | None, seen: int, exitcode: int | None = None
) -> errors.MemoryLimitExceeded:
    """The error of the item that was running when its worker went above the limit."""
    limit = limit or 0
    return errors.MemoryLimitExceeded(
        f"{fn_name(job)}() went over the memory limit: its worker process used "
        f"{format_bytes(seen)}, above max_memory_per_worker={format_bytes(limit)}. The "
        "worker was ended and replaced; other tasks are unaffected",
        limit,
        seen,
        exitcode,
    )
