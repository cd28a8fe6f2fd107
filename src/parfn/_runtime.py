"""The default pool: started lazily on first use, shut down at exit.

The one module-level mutable state of the front end, with ``_scope`` (the
pool of each context's ``with`` block).

Which pool a decorated function uses:

1. the innermost ``with parfn.Pool(...)`` block of this context (a
   ``contextvars`` variable: other threads are not taken over);
2. inside a worker process, or a task of a thread pool or of Dask, a serial
   pool: a nested ``.apply``/``.map`` runs in that worker or thread, so it can
   never wait for a worker that waits for it;
3. otherwise the default pool, started on first use (anew in a child of
   the user's ``os.fork()``: the parent's pool is the parent's).

No lock of this module is held while a pool starts: a process pool forks
its zygote then, and the zygote would inherit the lock held. A call that
raced ``parfn.shutdown()`` in another thread goes to the new default pool,
never fails with ``PoolClosed`` (``_successor``).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

from . import _scope
from ._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ("current_pool", "in_worker", "shutdown")

_lock = threading.Lock()
"""Guards the variables below; never held while a pool starts."""
_starting = threading.Lock()
"""Held while the default pool starts, so that only one starts."""
_default: Pool | None = None
_default_pid = 0  # the process the default pool belongs to
_in_worker_pool: Pool | None = None
_hooked = False
_exiting = False


def in_worker() -> bool:
    """True inside a worker process of the process backend, False elsewhere.

    >>> import parfn
    >>> parfn.in_worker()
    False
    """
    # (Read with a default: another thread of this process may be importing it.)
    worker = sys.modules.get("parfn.backends.process._worker")
    return bool(getattr(worker, "IN_WORKER", False))


def current_pool() -> Pool:
    """The pool a decorated function's call goes to, in this context."""
    pool = _scope.current.get()
    if pool is not None:
        return pool
    global _in_worker_pool
    if in_worker() or _scope.in_task.get():
        with _lock:
            if _in_worker_pool is None:
                from ._pool import Pool

                _in_worker_pool = Pool(backend="serial")
            return _in_worker_pool
    pool = _default
    if pool is not None and _default_pid == os.getpid():
        return pool
    return _start_default()


def _start_default() -> Pool:
    """Start the default pool, unless another thread just did."""
    global _default, _default_pid, _hooked
    with _starting:
        with _lock:
            if _default is not None and _default_pid == os.getpid():
                return _default
            if not _hooked:
                _hooked = True
                atexit.register(_at_exit)
                os.register_at_fork(after_in_child=_after_fork_in_child)
        from ._pool import Pool

        pool = Pool()  # forks, holding _starting only (reset in the child)
        pool._successor = lambda: _successor(pool)
        with _lock:
            _default, _default_pid = pool, os.getpid()
        return pool


def _after_fork_in_child() -> None:
    """In any forked child: the parent's default pool is not this process's,
    and a lock another thread held at the fork is held for ever here."""
    global _default, _default_pid
    _lock._at_fork_reinit()  # type: ignore[attr-defined]
    _starting._at_fork_reinit()  # type: ignore[attr-defined]
    _default, _default_pid = None, 0


def _successor(old: Pool) -> Pool | None:
    """The default pool that replaced ``old`` once ``shutdown()`` closed it, or
    None if ``old`` was closed otherwise (at exit, or still the default)."""
    with _lock:
        if old is _default or _exiting:
            return None
    return current_pool()


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
    global _exiting
    _exiting = True
    shutdown()
