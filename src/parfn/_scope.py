"""Which pool a ``with parfn.Pool(...)`` block made current, in this context,
and whether this thread runs a task of a thread pool or a Dask worker.

``contextvars`` variables, so a block does not take over other threads, and
an asyncio task sees the block it was created in. ``_pool`` sets ``current``
on entering a block, the thread and Dask backends set ``in_task`` while they
run items; ``_runtime`` reads both for every decorated call. It imports
nothing from parfn, so that none of those imports another.
"""

from __future__ import annotations

import contextvars

from ._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ("current", "in_task")

current: contextvars.ContextVar[Pool | None] = contextvars.ContextVar("parfn_pool", default=None)
"""The pool of the innermost ``with`` block of this context, or None."""

in_task: contextvars.ContextVar[bool] = contextvars.ContextVar("parfn_in_task", default=False)
"""True while this thread runs items of a thread-backend pool or of a Dask
task: a nested call runs here, in that thread (it never waits for a thread
that waits for it, and starts no process pool inside a Dask worker)."""
