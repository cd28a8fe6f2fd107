"""What a forked child must not keep of parfn's: held locks, the parent's pool descriptors.

A child of ``os.fork()`` has one thread, the one that forked; every lock
another thread held at that moment stays held for ever in the child. CPython
reinitialises some in the child: the GIL, the global import lock, threading's
own bookkeeping, and (through ``os.register_at_fork`` hooks) logging's locks
and those of ``concurrent.futures``' thread pool. It does not reinitialise any
other lock: not a lock of the user's, not a lock of parfn's, and not the
per-module import lock (``importlib._bootstrap._ModuleLock``) of a module
another thread was importing, whose half-imported module then waits for ever
in the child for an import that will never finish.

So, when the first process pool starts, parfn registers one hook that runs
in every forked child (a pool's zygote, a worker, a child of the user's own
``os.fork()``):

* it reinitialises parfn's module-level locks (``start_lock``, the wire's
  shared-memory lock, the lock that serialises the writing out of workers'
  output, a worker's frame-writing lock), which a thread of the parent
  (another pool's manager) may have held;
* it closes the parent's ends of every pool's pipes, pidfds and control
  sockets (``parent_fds``): the child cannot use its parent's pools (their
  threads and workers are the parent's, and a pool refuses to be used from
  another process), and a child that kept them would keep the parent's
  workers from seeing end-of-file when their pool closes.

And the zygote, right after it is forked, forgets the import locks that other
threads held (``forget_foreign_imports``): a worker that imports such a
module imports it afresh.
"""

from __future__ import annotations

import os
import sys

from ..._typing import Any
from ..._wire import shm
from .. import _replay
from . import _channel
from ._state import parent_fds, start_lock

__all__ = ("forget_foreign_imports", "prepare")

_registered = False


def prepare() -> None:
    """Register the at-fork hook, once per process tree (children inherit it)."""
    global _registered
    if not _registered:
        _registered = True
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _after_fork_in_child() -> None:
    reinit: Any
    for reinit in (start_lock, shm._lock, _replay._lock, _channel._write_lock):
        reinit._at_fork_reinit()
    for fd in parent_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    parent_fds.clear()


def forget_foreign_imports() -> None:
    """Drop the import locks that threads other than this one held at the fork.

    Each such lock guards a module another thread was importing, left
    half-imported here: it is removed from ``sys.modules`` too, so that an
    ``import`` of it in this process imports it afresh rather than waiting
    for ever. (The locks this thread holds are its own: it may be starting
    a pool while a module of its own is being imported.)
    """
    try:
        import _thread
        from importlib import _bootstrap

        me = _thread.get_ident()
        locks: dict[str, Any] = _bootstrap._module_locks  # type: ignore[attr-defined]
        for name, ref in list(locks.items()):
            lock = ref()
            if lock is None or lock.owner in (None, 0, me):
                continue
            del locks[name]
            module = sys.modules.get(name)
            if getattr(getattr(module, "__spec__", None), "_initializing", False):
                del sys.modules[name]
    except Exception:  # pragma: no cover - another Python's import internals
        pass
