"""Timeouts: one thread that expires each armed deadline when it passes.

A deadline is armed when the client hears that a timed item started on a
worker; what expiring means (TaskTimeout, a retry) is the backend's.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable

__all__ = ("Deadlines",)


class Deadlines:
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
