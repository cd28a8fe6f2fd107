"""The default pool: started lazily on first use, shut down at exit.

The one module-level mutable state of the front end, with ``_scope`` (the
pool of each context's ``with`` block).

Which pool a decorated function uses:

1. the innermost ``with parfn.Pool(...)`` block of this context (a
   ``contextvars`` variable: other threads are not taken over);
2. inside a worker process, a serial pool: a nested ``.apply``/``.map`` runs in
   that worker, so it can never wait for a worker that waits for it;
3. otherwise the default pool, started on first use.
"""

from __future__ import annotations

import atexit
import sys
import threading
from typing import TYPE_CHECKING

from . import _scope

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ("current_pool", "in_worker", "shutdown")

_lock = threading.Lock()
_default: Pool | None = None
_in_worker_pool: Pool | None = None
_hooked = False


def in_worker() -> bool:
    """True inside a worker process of the process backend, False elsewhere.

    >>> import parfn
    >>> parfn.in_worker()
    False
    """
    worker = sys.modules.get("parfn.backends.process._worker")
    return bool(worker is not None and worker.IN_WORKER)


def current_pool() -> Pool:
    """The pool a decorated function's call goes to, in this context."""
    pool = _scope.current.get()
    if pool is not None:
        return pool
    global _default, _in_worker_pool, _hooked
    with _lock:
        if in_worker():
            if _in_worker_pool is None:
                from ._pool import Pool

                _in_worker_pool = Pool(backend="serial")
            return _in_worker_pool
        if _default is None:
            from ._pool import Pool

            _default = Pool()
            if not _hooked:
                atexit.register(_at_exit)
                _hooked = True
        return _default


def shutdown(wait: bool = True, cancel_pending: bool = False) -> None:
    """Shut the default pool down now; the next call starts a new one.

    >>> import parfn
    >>> parfn.shutdown()
    """
    global _default
    with _lock:
        pool, _default = _default, None
    if pool is not None:
        pool.shutdown(wait=wait, cancel_pending=cancel_pending)


def _at_exit() -> None:
    """Shut down as a normal ``with`` exit does; Ctrl-C meanwhile ends the rest.

    (Other open process pools are shut down by the process backend's exit hook.)
    """
    shutdown()
