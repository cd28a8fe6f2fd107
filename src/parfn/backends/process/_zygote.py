"""The zygote: one process per pool that forks the pool's workers on request.

When a pool starts by fork (the default on Linux), its caller forks one
process, the zygote, before the pool's own threads exist and while parfn
holds no lock. The zygote is single-threaded: it waits on its control socket
and forks a worker for each request. So every worker of the pool, first or
replacement, is a copy of the same state (the caller's as it was when the
pool started), no worker is ever forked from a process whose other threads
could hold a lock, and a worker starts in about a millisecond.

What crosses the control socket (``SOCK_SEQPACKET``, one record a message)::

    parent -> zygote   b"F"                       fork one worker
    zygote -> parent   ("S", pid) + 3 fds         started: the parent's end of
                                                  its socket pair, its status slot
                                                  (a memfd) and a pidfd of it
    zygote -> parent   ("X", pid, exit code)      it exited, and was reaped

The workers are the zygote's children: the zygote reaps them and reports how
each ended (an exit code, or minus the signal that killed it, as
``Process.exitcode``); the parent watches each through its pidfd (the
sentinel) and kills through it, so no pid can be mistaken for a reused one.
The zygote dies with the pool's process: it waits on a pidfd of that process
too, and when it ends kills every worker and exits (parent killed by SIGKILL
included). It exits by itself once the pool closes its control socket and
every worker has exited.

Linux only (pidfds, memfds); elsewhere "fork" workers come from
``multiprocessing`` (see ``_start``).
"""

from __future__ import annotations

import _socket
import mmap
import os
import select
import signal
import struct
import sys
import threading
import time
import warnings

from ..._typing import Any
from . import _forksafe
from ._state import parent_fds, start_lock

__all__ = ("SLOT_BYTES", "ForkedWorker", "Zygote", "available")

SLOT_BYTES = 24
"""A worker's status slot: three float64 (see ``parfn._wire.protocol``)."""

_RECORD = struct.Struct("=cqi")  # kind, pid, exit code
_FDS = struct.Struct("=3i")
_FORK = b"F"


def available() -> bool:
    """Whether this platform can run a zygote (Linux: pidfds, memfds, seqpacket)."""
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "pidfd_open")
        and hasattr(os, "memfd_create")
        and hasattr(signal, "pidfd_send_signal")
    )


class ZygoteGone(RuntimeError):
    """The zygote died (killed from outside): the pool can start no worker."""


class Fd:
    """A file descriptor this process owns: closed only by ``close()``, only here.

    Unlike a socket or ``Connection`` object, it has no finalizer: a child
    forked by the user closes parfn's descriptors at once (``_forksafe``), and
    an inherited object must not close, when collected, a number the child
    has reused since.
    """

    __slots__ = ("_fd", "_pid")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pid = os.getpid()

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = -1


class ForkedWorker:
    """A worker the zygote forked, seen from the pool: what ``Process`` offers.

    ``sentinel`` (a pidfd) is readable once the worker has exited;
    ``exitcode`` is known once ``join`` has heard from the zygote: an exit
    code, or minus the signal that killed it (None: still running, or the
    zygote died before it could tell).
    """

    __slots__ = ("_done", "_zygote", "exitcode", "pid", "sentinel")

    def __init__(self, zygote: Zygote, pid: int, pidfd: int) -> None:
        self._zygote = zygote
        self._done = False
        self.pid = pid
        self.sentinel = pidfd
        self.exitcode: int | None = None

    def kill(self) -> None:
        if self.sentinel >= 0 and not self._done:
            try:
                signal.pidfd_send_signal(self.sentinel, signal.SIGKILL)
            except OSError:
                pass  # it has exited already

    def join(self, timeout: float | None = None) -> None:
        if not self._done:
            self._done, self.exitcode = self._zygote.wait_exit(self, timeout)

    def close(self) -> None:
        with start_lock:
            if self.sentinel >= 0:
                parent_fds.discard(self.sentinel)
                os.close(self.sentinel)
                self.sentinel = -1


class Zygote:
    """The parent's side of one pool's zygote.

    ``fork_workers`` and ``wait_exit`` may be called from any thread (the
    caller while the pool starts, then the manager thread); ``_lock``
    serialises their use of the control socket.
    """

    def __init__(
        self,
        init: bytes | None,
        initargs: tuple[Any, ...],
        thread_caps: dict[str, str] | None = None,
    ) -> None:
        """Fork the zygote now, from this thread. Call it before the pool's
        threads exist, holding no lock of parfn's. ``thread_caps`` go to
        ``worker_main`` in each worker, as ``init`` and ``initargs`` do."""
        _forksafe.prepare()
        self._lock = threading.Lock()
        self._exits: dict[int, int] = {}  # pid -> exit code, reported and not yet joined
        self._gone = False
        owner = os.getpid()
        _flush_std_streams()  # as multiprocessing does before it forks
        with start_lock:  # parent_fds is complete: no pool's pipe is half made
            # Made under the lock too: another pool's zygote, forked from
            # another thread, must not keep a copy of either end.
            ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
            self._fd = ours.detach()
            parent_fds.add(self._fd)
            with warnings.catch_warnings():
                # Python 3.12+ warns of any fork while other threads run; this
                # one is the documented start model, made safe as _forksafe
                # says (docs/guide/workers.md: what it cannot make safe).
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # pragma: no cover - the zygote (coverage does not follow forks)
                try:
                    _serve(theirs, owner, init, initargs, thread_caps)
                finally:
                    os._exit(70)
            theirs.close()
        self.pid = pid

    def fork_workers(self, n: int) -> list[tuple[ForkedWorker, Fd, mmap.mmap]]:
        """Have ``n`` workers forked: (handle, the parent's end of its socket, its status slot)."""
        started: list[tuple[ForkedWorker, Fd, mmap.mmap]] = []
        with self._lock:
            if n and not self._gone:
                try:
                    for _ in range(n):
                        os.write(self._fd, _FORK)
                except OSError:
                    self._gone = True
            while len(started) < n:
                record = self._receive(None)
                if record is None:  # an exit report, or the zygote's end
                    if self._gone:
                        raise ZygoteGone(self._death())
                    continue
                pid, fds = record
                conn, slot_fd, pidfd = fds
                try:
                    slot = mmap.mmap(slot_fd, SLOT_BYTES)
                finally:
                    with start_lock:
                        parent_fds.discard(slot_fd)
                        os.close(slot_fd)
                started.append((ForkedWorker(self, pid, pidfd), Fd(conn), slot))
        return started

    def wait_exit(self, worker: ForkedWorker, timeout: float | None) -> tuple[bool, int | None]:
        """Wait for the zygote's report that ``worker`` exited: (exited, exit code).

        If the zygote is gone, wait for the worker's own end instead (its
        exit code is then unknown: None).
        """
        pid = worker.pid
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while pid not in self._exits and not self._gone:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False, None
                self._receive(left)
            if pid in self._exits:
                return True, self._exits.pop(pid)
        ready, _, _ = select.select([worker.sentinel], [], [], timeout)
        return bool(ready), None

    def _receive(self, timeout: float | None) -> tuple[int, tuple[int, ...]] | None:
        """Read one record (caller holds ``_lock``): a started worker's (pid,
        fds), or None after recording an exit, a timeout or the zygote's end."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return None
        # Under start_lock, from the dup to the received descriptors' entry in
        # parent_fds: a zygote forked meanwhile by another pool (from another
        # thread) must not keep a copy of either (this zygote, or a worker,
        # would then never see end-of-file when this pool closes).
        fds: tuple[int, ...] = ()
        with start_lock:
            sock = _socket.socket(fileno=os.dup(self._fd))
            try:
                data, ancillary, _flags, _addr = sock.recvmsg(
                    64, _socket.CMSG_SPACE(_FDS.size), _socket.MSG_CMSG_CLOEXEC
                )
            except OSError:
                data, ancillary = b"", []
            finally:
                sock.close()
            for level, kind_, payload in ancillary:
                if level == _socket.SOL_SOCKET and kind_ == _socket.SCM_RIGHTS:
                    fds += struct.unpack(f"={len(payload) // 4}i", payload)
            parent_fds.update(fds)
        if len(data) != _RECORD.size:
            self._gone = True
            return None
        kind, pid, code = _RECORD.unpack(data)
        if kind == b"X":
            self._exits[pid] = code
            return None
        return pid, fds

    def _death(self) -> str:
        """Say how the zygote ended (reaping it)."""
        self.close()
        return (
            f"the pool's zygote process (pid {self.pid}), which starts its workers, has died "
            "(killed from outside?): no worker can be started; start a new pool"
        )

    def hang_up(self) -> None:
        """Ask for no more workers: the zygote still reports each one's end, and
        exits after the last (so that ``close`` need not wait for it to notice)."""
        with self._lock, start_lock:  # start_lock: see _receive, on dup
            if self._fd >= 0:
                sock = _socket.socket(fileno=os.dup(self._fd))
                try:
                    sock.shutdown(_socket.SHUT_WR)
                except OSError:
                    pass
                finally:
                    sock.close()

    def close(self) -> None:
        """Close the control socket (the zygote exits once its workers have), and reap it."""
        with start_lock:
            if self._fd < 0:
                return
            parent_fds.discard(self._fd)
            os.close(self._fd)
            self._fd = -1
        self._gone = True
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


# -- the zygote's side ----------------------------------------------------------------


def _serve(
    ctl: Any,
    owner: int,
    init: bytes | None,
    initargs: tuple[Any, ...],
    thread_caps: dict[str, str] | None = None,
) -> None:
    """The zygote's main loop: fork on request, reap and report, die with the owner.

    The fork's at-fork hook (``_forksafe``) has already closed the parent's
    descriptors of every pool, and reset parfn's locks.
    """
    _name_process("parfn-zygote")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _forksafe.forget_foreign_imports()
    try:
        owner_fd = os.pidfd_open(owner)
    except OSError:
        return
    if os.getppid() != owner:
        return  # the pool's process is gone already
    poller = select.poll()
    poller.register(ctl.fileno(), select.POLLIN)
    poller.register(owner_fd, select.POLLIN)
    children: dict[int, int] = {}  # pidfd -> pid
    open_ = True
    while open_ or children:
        for fd, _events in poller.poll():
            if fd == owner_fd:
                for pidfd in children:
                    try:
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    except OSError:
                        pass
                return
            if fd in children:
                pid = children.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                _send(ctl, _RECORD.pack(b"X", pid, os.waitstatus_to_exitcode(status)))
                continue
            try:
                request = ctl.recv(64)
            except OSError:
                request = b""
            if not request:  # the pool is closing: report the workers' ends, then exit
                open_ = False
                poller.unregister(ctl.fileno())
                continue
            pidfd, pid = _fork_worker(ctl, owner_fd, children, init, initargs, thread_caps)
            children[pidfd] = pid
            poller.register(pidfd, select.POLLIN)


def _fork_worker(
    ctl: Any,
    owner_fd: int,
    children: dict[int, int],
    init: bytes | None,
    initargs: tuple[Any, ...],
    thread_caps: dict[str, str] | None = None,
) -> tuple[int, int]:
    """Fork one worker and send the parent its descriptors: (its pidfd, its pid)."""
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    slot = os.memfd_create("parfn-status", os.MFD_CLOEXEC)
    os.ftruncate(slot, SLOT_BYTES)
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (ctl.detach(), owner_fd, ours.detach(), *children):
                os.close(fd)
            _name_process("parfn-worker")
            status = mmap.mmap(slot, SLOT_BYTES)
            os.close(slot)
            from ._worker import worker_main

            worker_main(Fd(theirs.detach()), status, init, initargs, thread_caps=thread_caps)
        finally:
            os._exit(1)
    pidfd = os.pidfd_open(pid)
    theirs.close()
    _send(ctl, _RECORD.pack(b"S", pid, 0), (ours.fileno(), slot, pidfd))
    ours.close()
    os.close(slot)
    return pidfd, pid


def _send(ctl: Any, record: bytes, fds: tuple[int, ...] = ()) -> None:
    # MSG_NOSIGNAL: a pool gone is an error here, not a SIGPIPE (which a
    # program may have set back to its default, killing).
    try:
        if fds:
            rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _FDS.pack(*fds))]
            ctl.sendmsg([record], rights, _socket.MSG_NOSIGNAL)
        else:
            ctl.send(record, _socket.MSG_NOSIGNAL)
    except OSError:
        pass  # the pool is gone: nobody to tell


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


def _name_process(name: str) -> None:
    """Show ``name`` in ps/top (Linux: the thread's comm)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name)
    except OSError:
        pass
