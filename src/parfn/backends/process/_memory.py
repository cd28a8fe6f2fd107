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

What is measured is a worker's own resident memory. First its resident set
(``/proc/<pid>/statm``: ~7 us to read). Only when that is above the limit,
the pages the worker alone maps (``Private_*`` of ``/proc/<pid>/smaps_rollup``,
~0.3 ms for a 1 GiB process): a worker forked from a caller that holds a big
array maps the caller's pages too, shared copy-on-write, and they are not its
own; a limit on the resident set would recycle every such worker after every
task.

The timer's period, measured on this project's 2-core machine: numpy fills
fresh memory at ~4 GiB/s (``np.ones``), so between two looks ``PERIOD``
apart a fast allocator gets up to ~400 MiB past the limit. The next look at
a worker is therefore sooner the closer it is to the limit: the time it
would take to reach it at that speed, between ``MIN_PERIOD`` and ``PERIOD``.
A look costs ~7 us per busy worker plus one turn of the manager's loop
(~50 us): at most ~0.1% of a CPU at ``PERIOD``, ~0.5% at ``MIN_PERIOD``,
and nothing while no worker is busy or no limit is set. Memory allocated
faster than it is seen is the kernel's to stop (a cgroup limit, the OOM
killer; see ``_oom``).

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
    "format_bytes",
    "memory_error",
    "parse_memory_limit",
    "recycle_if_over",
    "watch_memory",
    "worker_memory",
)

PERIOD = 0.1
"""Seconds between two looks at a busy worker far below the limit."""
MIN_PERIOD = 0.01
"""Seconds between two looks at a busy worker close to the limit."""
FAST_ALLOCATION = 4 * 2**30
"""Bytes per second a fast allocator fills (numpy's ``np.ones``, measured here)."""

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

    Units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024),
    in any case, with or without a space.

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


def worker_memory(pid: int, limit: int) -> int | None:
    """The process ``pid``'s own resident memory, in bytes; None if it is gone.

    Its resident set, or, when that is above ``limit``, only the pages no
    other process maps (see the module docstring).
    """
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            rss = int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None
    if rss <= limit:
        return rss
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            rollup = f.read()
    except OSError:
        return rss  # Linux before 4.14: the resident set it is
    private = 0
    for line in rollup.splitlines():
        if line.startswith(b"Private_"):
            private += int(line.split()[1]) * 1024  # kB
    return private


def recycle_if_over(pool: PoolState, worker: Worker) -> None:
    """After a task: retire ``worker`` if it is above the limit. Takes ``_lock``."""
    limit = pool._memory_limit
    if limit is None or worker.retiring:
        return
    seen = worker_memory(worker.process.pid, limit)
    if seen is not None and seen > limit:
        with pool._lock:
            worker.retiring = True


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
        seen = worker_memory(worker.process.pid, limit)
        if seen is None:
            continue  # it just died: its sentinel says so
        if seen > limit:
            if _over(pool, worker, seen):
                delay = MIN_PERIOD
        else:
            worker.memory_over = None
            delay = min(delay, max(MIN_PERIOD, (limit - seen) / FAST_ALLOCATION))
    pool._memory_look = now + delay
    return delay


def _over(pool: PoolState, worker: Worker, seen: int) -> bool:
    """A busy worker is above the limit. True: look again soon, to confirm.

    The item it runs fails if it is still running, still above the limit, at
    the next look (``MIN_PERIOD`` later): an item that went over and ended
    just after (a leak's last allocation) leaves a worker to recycle, and no
    error. A worker that was above the limit before its run began (it is
    already retiring) is killed with no blame: its runs go back to the queue.
    """
    with pool._lock:
        if worker.kill_reason is not None or worker not in pool._workers:
            return False
        run_id, index, _ = worker.read_status()
        if not run_id:
            worker.retiring = True  # between two runs: recycled, as after a task
            return False
        if worker.retiring:
            worker.kill_reason = ("recycle", run_id, -2)
        elif worker.memory_over != (run_id, index):
            worker.memory_over = (run_id, index)  # seen once: confirm at the next look
            return True
        else:
            worker.kill_reason = ("memory", run_id, index)
            worker.memory_seen = seen
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
