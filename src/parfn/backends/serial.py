"""The serial backend: every item runs in the caller, at submit time.

For debugging (a breakpoint in the function just works) and for tests. A
``timeout`` cannot be enforced here and is ignored; ``retries`` applies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .._typing import Any
from .._wire.execute import run_items
from ._base import Counts, Job

__all__ = ("SerialBackend",)


class SerialBackend:
    name = "serial"
    can_stop_running = False

    def __init__(
        self,
        workers: int | None = None,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self.workers = 1
        self._lock = threading.Lock()
        self._running = self._retried = 0  # for pool.stats() (guarded by _lock)
        if initializer is not None:
            initializer(*initargs)

    def submit(self, job: Job) -> None:
        if not job.sink.start():
            return
        with self._lock:
            self._running += 1
        try:
            values, errors, elapsed, retried = run_items(
                job.fn,
                job.items,
                0,
                len(job.items),
                job.options.retries,
                star=job.star,
                kwargs=job.kwargs,
            )
        finally:
            with self._lock:
                self._running -= 1
        with self._lock:
            self._retried += retried
        job.sink.deliver(0, values, errors, elapsed)

    def cancel(self, job: Job) -> bool:
        return False  # a job runs to its end inside submit()

    def counts(self) -> Counts:
        with self._lock:
            return Counts(running=self._running, workers=1, retried=self._retried)

    def shutdown(self, wait: bool, cancel_pending: bool, terminate: bool = False) -> None:
        pass  # nothing is ever queued or running once submit() returns
