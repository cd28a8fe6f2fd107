"""The serial backend: every item runs in the caller, at submit time.

For debugging (a breakpoint in the function just works) and for tests. A
``timeout`` cannot be enforced here and is ignored; ``retries`` applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._wire.execute import run_items
from ._base import Job

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
        if initializer is not None:
            initializer(*initargs)

    def submit(self, job: Job) -> None:
        if not job.sink.start():
            return
        values, errors, elapsed = run_items(
            job.fn,
            job.items,
            0,
            len(job.items),
            job.options.retries,
            star=job.star,
            kwargs=job.kwargs,
        )
        job.sink.deliver(0, values, errors, elapsed)

    def cancel(self, job: Job) -> bool:
        return False  # a job runs to its end inside submit()

    def shutdown(self, wait: bool, cancel_pending: bool, terminate: bool = False) -> None:
        pass  # nothing is ever queued or running once submit() returns
