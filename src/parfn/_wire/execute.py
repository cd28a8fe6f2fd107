"""Running a run of items: the one loop every backend's executor shares.

Kept free of I/O (it imports only the status-slot positions of
``protocol``), so that a worker process, a thread and a Dask worker all run
items the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from itertools import starmap

from .._typing import Any
from .protocol import ANY_ITEM, SLOT_INDEX, SLOT_START

__all__ = ("run_items",)

Item = Any
"""One call's positional arguments (see ``parfn.backends._base.Job``)."""


def run_items(
    fn: Callable[..., Any],
    items: Sequence[Item],
    lo: int,
    hi: int,
    retries: int,
    status: Any = None,
    timed: bool = False,
    *,
    star: bool = True,
    kwargs: dict[str, Any] | None = None,
    interrupts: bool = False,
) -> tuple[list[Any], dict[int, BaseException], float, int]:
    """Run ``fn`` on ``items[lo:hi]`` (see ``Job``); each item fails alone.

    Returns ``(values, errors, elapsed, retried)``: ``values[i - lo]`` is item
    i's result (None where it failed), ``errors[i]`` the exception item i
    raised after ``retries`` more tries, ``retried`` how many times an item
    was run again. ``status`` (a process worker's status slot,
    float64) gets each item's index as it starts and, when ``timed``, its
    start time. A SystemExit raised by the function is its outcome, as in
    ``concurrent.futures``. So is a KeyboardInterrupt when ``interrupts``:
    where it cannot be the user's Ctrl-C (a worker process ignores SIGINT, and
    only the main thread gets it), it is the function's own, as the standard
    library's pools return it; elsewhere (the serial backend, in the caller)
    it is not caught.
    """
    caught: tuple[type[BaseException], ...] = (
        (Exception, SystemExit, KeyboardInterrupt) if interrupts else (Exception, SystemExit)
    )
    values: list[Any] = []
    errors: dict[int, BaseException] = {}
    start = time.perf_counter()
    if retries == 0 and not timed and not kwargs and hi - lo > 1:
        # The hot path of a map chunk: the calls run in C (map/starmap), and
        # an item that raises is found by how far the results got. A process
        # worker marks only "somewhere in this run" (ANY_ITEM): if it dies
        # here, the parent runs the items again one by one to find which.
        if status is not None:
            status[SLOT_INDEX] = ANY_ITEM
        calls = items[lo:hi]
        apply = starmap if star else map
        done = 0
        while done < len(calls):
            try:
                values.extend(apply(fn, calls[done:] if done else calls))
                break
            except caught as exc:
                errors[lo + len(values)] = exc
                values.append(None)
                done = len(values)
        return values, errors, time.perf_counter() - start, 0
    kw = kwargs or {}
    append = values.append
    retried = 0
    for i in range(lo, hi):
        args = items[i] if star else (items[i],)
        for attempt in range(retries + 1):
            if status is not None:
                if timed:
                    status[SLOT_START] = time.monotonic()
                status[SLOT_INDEX] = i
            try:
                value = fn(*args, **kw)
            except caught as exc:
                if attempt == retries:
                    append(None)
                    errors[i] = exc
                else:
                    retried += 1
            else:
                append(value)
                break
    return values, errors, time.perf_counter() - start, retried
