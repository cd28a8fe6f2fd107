"""The worker process: its main loop, and nothing the parent does not need.

It reads frames from its pipe, runs each Batch's Runs in order, and answers
each Batch with one Results frame. It imports only what running items needs,
so a spawned worker starts quickly.

How a worker ends:

* its pipe reaches end-of-file (the pool closed it, or the parent died): it
  exits at once, between two runs;
* the parent dies while it is running an item: on Linux the kernel sends it
  SIGKILL (``PR_SET_PDEATHSIG``); elsewhere it exits at the end of the item;
* the parent kills it (a timeout, ``cancel()``, shutdown with cancel_pending).

SIGINT is ignored here: Ctrl-C goes to the whole process group, and it is the
parent that decides what to stop.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from ..._typing import Any
from ..._wire import capture
from ..._wire.errors import SerializationError
from ..._wire.execute import run_items
from ..._wire.protocol import (
    SLOT_INDEX,
    SLOT_JOB,
    SLOT_START,
    Batch,
    Cancel,
    Define,
    Done,
    Forget,
    InitFailed,
    LogLevels,
    Results,
    Run,
    decode,
    encode,
)
from ..._wire.serialize import ExceptionEnvelope, dumps, load_function, loads
from ..._wire.shm import fault_path
from ..._wire.threadcaps import apply_thread_caps
from ._channel import Reader, write_frame

__all__ = ("IN_WORKER", "worker_main")

IN_WORKER = False
"""True in a worker process of the process backend (read by ``parfn.in_worker``)."""


def worker_main(
    conn: Any,
    slot: Any,
    init: bytes | None,
    initargs: tuple[Any, ...],
    *,
    parent_pid: int = 0,
    owner_pid: int = 0,
    close_fds: Sequence[int] = (),
    thread_caps: Mapping[str, str] | None = None,
) -> None:
    """Entry point of a worker process: its start-up, step by step, then its loop.

    Called in the worker by the pool's zygote (``_zygote``), or as the target
    of a ``multiprocessing.Process`` (spawn, forkserver). ``conn``: the
    worker's end of its pipe (anything with ``fileno()``); ``slot``: its
    status slot (shared memory: three float64); ``init``: the pickled
    initializer. ``owner_pid``: the pool's process, when it is not the
    zygote's to end this worker with it (``parent_pid``: this process's
    parent, 0 if that is a forkserver). ``close_fds``: descriptors the worker
    inherited and must close. ``thread_caps``: the variables that cap the
    numerical libraries' threads (``_wire.threadcaps``).

    The steps run in this order; a new step goes here, before the
    initializer when it must be in place before any user code runs.
    """
    global IN_WORKER
    IN_WORKER = True
    _close(close_fds)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    apply_thread_caps(thread_caps or {})  # BLAS/OpenMP threads, before any user code
    if owner_pid:
        _die_with_parent(parent_pid, owner_pid)
    status: Any = memoryview(slot).cast("B").cast("d")  # float64 slots
    fd = conn.fileno()
    # Its logs and prints go to the parent, from the initializer on.
    capture.install(lambda frame: write_frame(fd, frame), fault_path(os.getpid()))
    if not _run_initializer(fd, init, initargs):
        os._exit(1)
    _Worker(conn, status).loop()
    os._exit(0)


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _die_with_parent(parent_pid: int, owner_pid: int) -> None:
    """End this process when the pool's process dies, even by SIGKILL.

    (A worker of the zygote needs none of this: the zygote watches the pool's
    process and kills its workers when it ends.) Two guards: Linux's
    parent-death signal (for spawn, the parent is the pool's process), and a
    thread that waits on a pidfd of the pool's process (for forkserver, whose
    server is the parent and does not exit while its children live).
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except Exception:  # pragma: no cover - no libc
            pass
    if parent_pid and os.getppid() != parent_pid:
        os._exit(0)  # the parent is already gone
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(owner_pid)
        except OSError:
            os._exit(0)  # it is gone already
        threading.Thread(target=_watch, args=(pidfd,), name="parfn-watchdog", daemon=True).start()


def _watch(pidfd: int) -> None:
    select.select([pidfd], [], [])  # readable when that process has exited
    os._exit(1)


def _run_initializer(fd: int, init: bytes | None, initargs: tuple[Any, ...]) -> bool:
    """Run the pool's initializer; if it raises, tell the parent (InitFailed): False.

    The parent may have closed the pipe meanwhile (the pool shut down): then
    nobody is told, and nothing is printed.
    """
    if init is None:
        return True
    try:
        load_function(init)(*initargs)
    except Exception as exc:
        try:
            write_frame(fd, encode(InitFailed(ExceptionEnvelope(exc))))
        except OSError:
            pass
        return False
    return True


class _Worker:
    def __init__(self, conn: Any, status: Any) -> None:
        self.conn = conn
        self.status = status
        self.functions: dict[int, Callable[..., Any]] = {}
        self.broken_functions: dict[int, BaseException] = {}
        self.pending: deque[Batch] = deque()
        self.cancelled: set[int] = set()

    def loop(self) -> None:
        reader, fd = Reader(self.conn.fileno()), self.conn.fileno()
        while True:
            try:
                # Wait for work, or take in what was sent meanwhile (Cancel included).
                for frame in reader.read(wait=not self.pending):
                    self._handle(decode(frame))
            except (EOFError, OSError):
                return
            if self.pending:
                batch = self.pending.popleft()
                results = encode(Results([self._run(run) for run in batch.runs]))
                capture.end_of_batch()  # what it printed goes first
                try:
                    write_frame(fd, results)
                except OSError:
                    return  # the parent closed its end: nobody to answer

    def _handle(self, message: Any) -> None:
        if isinstance(message, Batch):
            self.pending.append(message)
        elif isinstance(message, Define):
            try:
                self.functions[message.fn_id] = load_function(message.data)
            except Exception as exc:
                self.broken_functions[message.fn_id] = SerializationError(
                    f"the function could not be loaded in the worker: {exc!r}"
                )
        elif isinstance(message, Cancel):
            self.cancelled.add(message.run_id)
        elif isinstance(message, Forget):
            for fn_id in message.fn_ids:
                self.functions.pop(fn_id, None)
                self.broken_functions.pop(fn_id, None)
        elif isinstance(message, LogLevels):
            capture.set_levels(message)
        else:  # pragma: no cover - a bug in the parent
            raise TypeError(f"unexpected message {message!r}")

    def _run(self, run: Run) -> Done:
        if run.run_id in self.cancelled:
            self.cancelled.discard(run.run_id)
            return Done(run.run_id, run.lo, run.hi, None, 0.0)
        status = self.status
        status[SLOT_INDEX] = -1.0
        status[SLOT_START] = time.monotonic()
        status[SLOT_JOB] = float(run.run_id)
        try:
            fn = self.functions[run.fn_id]
            capture.running(fn)
            star, kwargs, items = loads(run.data, "the arguments")
        except Exception as exc:
            if run.fn_id not in self.broken_functions and run.hi - run.lo > 1:
                # One of the items cannot be loaded here: the parent sends
                # them again one by one, so that only that one fails.
                return Done(run.run_id, run.lo, run.hi, b"", 0.0)
            error = self.broken_functions.get(run.fn_id, exc)
            errors = {i: ExceptionEnvelope(error) for i in range(run.lo, run.hi)}
            return Done(
                run.run_id,
                run.lo,
                run.hi,
                dumps(([None] * (run.hi - run.lo), errors), main_by_reference=True),
                0.0,
            )

        values, raised, elapsed, retried = run_items(
            fn,
            items,
            run.lo,
            run.hi,
            run.retries,
            status,
            run.timed,
            star=star,
            kwargs=kwargs,
            interrupts=True,
        )
        status[SLOT_JOB] = 0.0
        errors = {i: ExceptionEnvelope(exc) for i, exc in raised.items()}
        payload = _pack(values, errors, run.lo, run.data)
        return Done(run.run_id, run.lo, run.hi, payload, elapsed, retried)


_INLINE_RUN = 8
"""Runs up to this long whose values are all plain scalars travel inline."""
_SCALARS = frozenset({int, float, bool, type(None), complex})


def _pack(
    values: list[Any], errors: dict[int, ExceptionEnvelope], lo: int, inputs: bytes
) -> bytes | list[Any]:
    """Pickle a run's outcomes; a result that cannot be pickled fails alone.

    Big buffers go through shared memory, for the parent to own; one returned
    unchanged from the run's arguments (``inputs``) borrows their segment.
    A short run of plain scalars (numbers, None, short strings) that raised
    nothing is returned as is, to travel inline in the Results message: one
    pickle for the whole message, and nothing that can fail to pickle or load.
    """
    if not errors and len(values) <= _INLINE_RUN:
        for v in values:
            if type(v) not in _SCALARS and not (type(v) is str and len(v) < 256):
                break
        else:
            return values
    # The caller's __main__ is the script: its classes' objects go by reference.
    try:
        return dumps((values, errors), shm="one", inputs=inputs, main_by_reference=True)
    except SerializationError:
        pass
    for k, value in enumerate(values):
        try:
            dumps(value, main_by_reference=True)
        except SerializationError as exc:
            values[k] = None
            errors[lo + k] = ExceptionEnvelope(
                SerializationError(str(exc).replace("the value", "the result", 1))
            )
    return dumps((values, errors), shm="one", inputs=inputs, main_by_reference=True)
