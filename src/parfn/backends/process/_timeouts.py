"""Timeouts: per-item deadlines, the manager thread's only timer.

A worker writes each item's start time to its status slot; an item still
running when its job's timeout has passed gets its worker killed (with
``kill_reason`` "timeout"), and the death accounting fails that item with
``TaskTimeout``. The manager blocks in ``select`` until the nearest deadline.
"""

from __future__ import annotations

import time

from ._state import PoolState, Worker

__all__ = ("check_deadlines",)


def _deadlines(pool: PoolState) -> list[tuple[Worker, float, int, int]]:
    """(worker, deadline, run id, item index) for each worker with timed runs.

    For a timed run that has not started yet, the deadline is provisional
    (now + its timeout): never later than the real one will be, so the
    manager wakes in time and reads the status slot again.
    """
    out = []
    now = time.monotonic()
    with pool._lock:
        for worker in pool._workers:
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


def check_deadlines(pool: PoolState) -> float | None:
    """Kill workers whose item overran; seconds until the next deadline (None: no timer).

    Manager thread; takes ``_lock``.
    """
    if not pool._timed:
        return None
    now = time.monotonic()
    nearest: float | None = None
    for worker, deadline, run_id, index in _deadlines(pool):
        if deadline <= now and run_id:
            with pool._lock:
                if worker.read_status()[:2] == (run_id, index) and worker.kill_reason is None:
                    worker.kill_reason = ("timeout", run_id, index)
                    worker.process.kill()
        elif nearest is None or deadline < nearest:
            nearest = deadline
    return None if nearest is None else max(0.0, nearest - now)
