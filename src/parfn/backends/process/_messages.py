"""What the parent does with each message a worker sends, in the order sent.

Both readers of a worker's pipe call ``read_messages``: the manager thread
(``_on_readable``) and a caller that borrowed an idle worker (``_talk``).
Records and output are shown at once (``parfn.backends._replay``), so that
they come before the results that follow them in the pipe; results are
accounted for under the lock and returned, to be delivered with no lock held.
"""

from __future__ import annotations

from ..._typing import Any
from ..._wire.protocol import InitFailed, Log, Output, Results, decode
from .._replay import replay
from ._deaths import on_init_failed
from ._results import on_results
from ._state import PoolState, Work, Worker

__all__ = ("read_messages",)


def read_messages(
    pool: PoolState, worker: Worker, frames: list[bytes]
) -> tuple[list[tuple[Work, Any]], bool]:
    """Handle ``frames`` from ``worker``: the runs to deliver, and whether its
    initializer failed (its runs are failed already; it exits)."""
    delivered: list[tuple[Work, Any]] = []
    for frame in frames:
        message = decode(frame)
        kind = type(message)
        if kind is Results:
            if worker.output.partial:
                worker.output.end_task()  # a partial line the task left is a line
            delivered += on_results(pool, worker, message)  # type: ignore[arg-type]
        elif kind is Output:
            worker.output.write(message.stream, message.text)  # type: ignore[union-attr]
        elif kind is Log:
            replay(message.record)  # type: ignore[union-attr]
        elif kind is InitFailed:
            worker.output.end_task()
            # Its envelope was rebuilt into the exception while decoding.
            on_init_failed(pool, worker, message.error)  # type: ignore[union-attr, arg-type]
            return delivered, True
    return delivered, False
