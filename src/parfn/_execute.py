"""Running a run of items: the one loop every backend's executor shares.

Kept free of I/O and of parfn's other modules but the error types, so that a
worker process, a thread and a Dask worker all run items the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ._protocol import SLOT_INDEX, SLOT_START
from .backends._base import Item

__all__ = ("run_items",)


def run_items(
    fn: Callable[..., Any],
    items: Sequence[Item],
    lo: int,
    hi: int,
    retries: int,
    status: Any = None,
    timed: bool = False,
) -> tuple[list[Any], dict[int, BaseException], float]:
    """Run ``fn`` on ``items[lo:hi]``; each item fails alone.

    Returns ``(values, errors, elapsed)``: ``values[i - lo]`` is item i's
    result (None where it failed), ``errors[i]`` the exception item i raised
    after ``retries`` more tries. ``status`` (a process worker's status slot,
    float64) gets each item's index as it starts and, when ``timed``, its
    start time. KeyboardInterrupt and SystemExit are not caught.
    """
    values: list[Any] = []
    append = values.append
    errors: dict[int, BaseException] = {}
    start = time.perf_counter()
    if retries == 0 and not timed:
        # The hot path of a map: at most one store per item.
        for i in range(lo, hi):
            if status is not None:
                status[SLOT_INDEX] = i
            args, kwargs = items[i]
            try:
                append(fn(*args, **kwargs))
            except Exception as exc:
                append(None)
                errors[i] = exc
        return values, errors, time.perf_counter() - start
    for i in range(lo, hi):
        args, kwargs = items[i]
        for attempt in range(retries + 1):
            if status is not None:
                if timed:
                    status[SLOT_START] = time.monotonic()
                status[SLOT_INDEX] = i
            try:
                value = fn(*args, **kwargs)
            except Exception as exc:
                if attempt == retries:
                    append(None)
                    errors[i] = exc
            else:
                append(value)
                break
    return values, errors, time.perf_counter() - start
