"""Which pool a ``with parfn.Pool(...)`` block made current, in this context.

A ``contextvars`` variable, so a block does not take over other threads, and
an asyncio task sees the block it was created in. ``_pool`` sets it on
entering a block; ``_runtime`` reads it for every decorated call. It imports
nothing from parfn, so that neither of those two imports the other.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ("current",)

current: contextvars.ContextVar[Pool | None] = contextvars.ContextVar("parfn_pool", default=None)
"""The pool of the innermost ``with`` block of this context, or None."""
