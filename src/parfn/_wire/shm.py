"""Shared memory: how a big array crosses between the caller and a worker.

``dumps(obj, shm=...)`` (in ``serialize``) pickles with protocol 5 and a
``buffer_callback``: each buffer of at least :data:`THRESHOLD` bytes (a numpy
array's data, any ``PickleBuffer``) is left out of the pickle stream and
written into a *segment* of its own, a file in ``/dev/shm`` named
``parfn-<creator pid>-<pid namespace>-<random>``. So is the stream itself
when it is big (big ``bytes``/``bytearray``/``str`` values, which pickle
always keeps in the stream). What crosses the pipe is a small message
naming the segments. One segment per buffer, so that each array's memory is
freed with that array, whatever becomes of the others.

That message is itself a pickle, made by hand::

    PROTO 5, GLOBAL parfn._wire.shm._load, owned names, spec, stream, TUPLE3, REDUCE, STOP

so ``pickle.loads`` of it calls :func:`_load`, which maps the segments and
unpickles the objects over the mappings, without a copy: ``loads`` needs no
special case and ordinary data costs nothing more. The names of the segments
the message owns sit at a fixed place, so :func:`release` finds them without
unpickling anything.

How a receiver maps a segment, chosen by the sender:

* ``readers="one"`` (a worker's results, loaded once, by the parent):
  ``MAP_SHARED``. The receiver is the only process with a mapping (the
  creator wrote it with ``pwrite`` and keeps none) and the name is unlinked
  right after loading: the memory is the receiver's own. Writing it in
  place costs no copy and no second page. (The one way to see it shared:
  a child forked later inherits the mapping as shared, not copy-on-write.)
* ``readers="many"`` (a job's arguments, which several workers may load, and
  load again after a crash): ``MAP_PRIVATE``. Pages are shared until written;
  a write copies the page, so no receiver ever sees another's writes.

Either way the arrays are writable, the mapping outlives the unlinking of the
name, and it is unmapped when the last object over it is garbage collected.

A buffer a worker returns unchanged from its arguments (``return arr``, a
slice of it) is not copied again: the result *borrows* the arguments'
segment, naming it without owning it (the parent keeps the arguments'
segment until their results are loaded). "Unchanged" is checked, not
assumed: ``/proc/self/pagemap`` tells whether any page of the buffer was
copied on write.

Lifetime -- the one rule: **whoever owns a segment unlinks it**, and ownership
passes with the message. The creator owns it until it hands the message
over: the parent unlinks its argument segments when their job is done
(``release(args_data)``) and, since a result message belongs to the parent
once received, the parent unlinks a worker's result segment right after
loading it (``release(payload)``). A worker that dies before its message is
received leaves its segments behind: :func:`release_leftovers` (its pid)
removes them, and at exit each process removes its own.
"""

from __future__ import annotations

import atexit
import mmap
import os
import pickle
import struct
import sys
import threading
import time
import weakref

from .._typing import Any, Literal

__all__ = (
    "SHM_DIR",
    "THRESHOLD",
    "Readers",
    "available",
    "fault_path",
    "has_segments",
    "pack",
    "release",
    "release_leftovers",
    "segment_names",
    "segment_prefix",
    "sweep_stale",
)

Readers = Literal["one", "many"]

SHM_DIR = "/dev/shm"
THRESHOLD = 1 << 20
"""Bytes: a buffer (or a whole pickle stream) this big travels through shared memory."""
NAME_PREFIX = "parfn-"
FAULT_PREFIX = NAME_PREFIX + "fault-"
"""Not a segment: the file a worker's faulthandler writes to (``fault_path``)."""
_ALIGN = 64

_MODULE = b"parfn._wire.shm"
_HEAD = b"\x80\x05\x8c" + bytes([len(_MODULE)]) + _MODULE + b"\x8c\x05_load\x93"
"""PROTO 5, SHORT_BINUNICODE module, SHORT_BINUNICODE name, STACK_GLOBAL.

An ordinary pickle of ours never starts so: the C pickler opens every stream
longer than a few bytes with a FRAME opcode.
"""
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TAIL = b"\x87R."  # TUPLE3, REDUCE, STOP

_PRESENT, _SWAPPED, _FILE_PAGE = 0x80, 0x40, 0x20  # top byte of a pagemap entry
_CHANGED = bytes(
    int(bool(b & _SWAPPED or (b & _PRESENT and not b & _FILE_PAGE))) for b in range(256)
)
"""For a pagemap entry's top byte: 1 if the page was copied on write (or swapped)."""

_lock = threading.Lock()
_available: bool | None = None
_exit_hook_pid = 0
_pid_namespace: int | None = None
_received: list[tuple[str, weakref.ref[mmap.mmap]]] = []
"""Private mappings this process made of segments (name, mapping): what a result may borrow."""


def available() -> bool:
    """Whether this machine has a writable ``/dev/shm`` (checked once per process)."""
    global _available
    if _available is None:
        _available = (
            sys.platform.startswith("linux")
            and os.path.isdir(SHM_DIR)
            and os.access(SHM_DIR, os.W_OK | os.X_OK)
        )
    return _available


# -- the sender's side ------------------------------------------------------------


def pack(
    stream: bytes,
    buffers: list[pickle.PickleBuffer],
    readers: Readers,
    inputs: bytes | None = None,
) -> bytes | None:
    """The message for a pickle ``stream`` whose big ``buffers`` were left out of it.

    ``inputs``: a message this process loaded (a run's arguments) whose
    segments the sender of ``inputs`` keeps until this message is loaded: a
    buffer found unchanged in one of them is borrowed, not copied. None when
    shared memory cannot be used (full, missing): the caller pickles in-band.
    """
    if not available():
        return None
    borrowable = _mappings_of(inputs) if inputs else []
    owned: list[str] = []
    segments: list[tuple[str, int, bool]] = []  # (name, size, private)
    spans: list[tuple[int, int, int]] = []  # per buffer: (segment index, offset, length)
    try:
        for buf in buffers:
            view = buf.raw()
            found = _borrow(view, borrowable) if borrowable else None
            if found is not None:
                name, size, offset = found
                if (name, size, True) not in segments:
                    segments.append((name, size, True))
                spans.append((segments.index((name, size, True)), offset, view.nbytes))
                continue
            created = _create(view)
            if created is None:
                raise _NoRoom
            owned.append(created)
            segments.append((created, view.nbytes, readers == "many"))
            spans.append((len(segments) - 1, 0, view.nbytes))
        stream_at = -1  # the stream's segment, if it has one
        if len(stream) >= THRESHOLD:
            created = _create(memoryview(stream))
            if created is None:
                raise _NoRoom
            owned.append(created)
            segments.append((created, len(stream), readers == "many"))
            stream_at = len(segments) - 1
            stream = b""
    except BaseException as exc:
        for name in owned:
            _unlink(name)
        if isinstance(exc, _NoRoom):
            return None
        raise
    spec = pickle.dumps((segments, spans, stream_at), 5)
    names = " ".join(owned).encode()
    return b"".join(
        (
            _HEAD,
            b"X",  # BINUNICODE: the names of the segments this message owns
            _U32.pack(len(names)),
            names,
            b"\x8e",  # BINBYTES8
            _U64.pack(len(spec)),
            spec,
            b"\x8e",
            _U64.pack(len(stream)),
            stream,
            _TAIL,
        )
    )


class _NoRoom(Exception):
    pass


def _create(data: memoryview) -> str | None:
    """A new segment holding ``data``; None if there is no room (or no ``/dev/shm``)."""
    size = data.nbytes
    try:
        st = os.statvfs(SHM_DIR)
        if st.f_bavail * st.f_frsize < size + (16 << 20):
            return None
    except OSError:
        return None
    _hook_exit()
    name = f"{segment_prefix(os.getpid())}{os.urandom(8).hex()}"
    try:
        fd = os.open(
            os.path.join(SHM_DIR, name),
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
    except OSError:
        return None
    try:
        done = 0
        while done < size:
            done += os.pwrite(fd, data[done:], done)
    except BaseException as exc:
        _unlink(name)
        if isinstance(exc, OSError):  # ENOSPC, EFBIG: in-band instead
            return None
        raise
    finally:
        os.close(fd)
    return name


# -- the receiver's side -----------------------------------------------------------


def _load(owned: str, spec: bytes, stream: bytes) -> Any:
    """Map the segments a message names; unpickle its stream over them (no copy).

    ``owned`` (the names of the segments the message owns) is for ``release``.
    """
    segments, spans, stream_at = pickle.loads(spec)
    views = [memoryview(_map(name, size, private)) for name, size, private in segments]
    buffers = [views[i][offset : offset + n] for i, offset, n in spans]
    return pickle.loads(stream if stream_at < 0 else views[stream_at], buffers=buffers)


def _map(name: str, size: int, private: bool) -> mmap.mmap:
    if not name.startswith(NAME_PREFIX) or "/" in name:
        raise ValueError(f"not a parfn shared-memory segment: {name!r}")
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the shared-memory segment {name} is gone (released before it was loaded)"
        ) from None
    try:
        if os.fstat(fd).st_size < size:
            raise ValueError(f"the shared-memory segment {name} is shorter than {size} bytes")
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if sys.version_info >= (3, 13):  # keep no file descriptor per mapping
            mm = mmap.mmap(fd, size, flags=flags, prot=prot, trackfd=False)
        else:  # pragma: no cover - depends on the Python version
            mm = mmap.mmap(fd, size, flags=flags, prot=prot)
    finally:
        os.close(fd)
    if private:  # a shared mapping's pages show no sign of being written: never borrowed
        with _lock:
            _received[:] = [r for r in _received if r[1]() is not None]
            _received.append((name, weakref.ref(mm)))
    return mm


# -- borrowing an unchanged buffer ---------------------------------------------------


def _mappings_of(inputs: bytes) -> list[tuple[str, int, int]]:
    """(name, address, size) of the live mappings this process made of ``inputs``' segments."""
    wanted = set(segment_names(inputs))
    if not wanted:
        return []
    import ctypes

    out = []
    with _lock:
        received = list(_received)
    for name, ref in received:
        mm = ref()
        if name in wanted and mm is not None and not mm.closed:
            try:
                anchor = ctypes.c_char.from_buffer(mm)
            except (TypeError, ValueError, BufferError):
                continue
            out.append((name, ctypes.addressof(anchor), len(mm)))
            del anchor
    return out


def _borrow(view: memoryview, mappings: list[tuple[str, int, int]]) -> tuple[str, int, int] | None:
    """(segment name, segment size, offset) if ``view`` lies, unchanged, in one of ``mappings``."""
    import ctypes

    try:
        anchor = ctypes.c_char.from_buffer(view)
    except (TypeError, ValueError, BufferError):
        return None  # read-only: not one of our (writable) mappings
    address = ctypes.addressof(anchor)
    del anchor
    for name, base, size in mappings:
        if base <= address and address + view.nbytes <= base + size:
            if _unchanged(address, view.nbytes):
                return name, size, address - base
            return None
    return None


def _unchanged(address: int, length: int) -> bool:
    """Whether no page of this private file mapping was copied on write (or swapped)."""
    page = mmap.PAGESIZE
    first, last = address // page, (address + length - 1) // page
    n = (last - first + 1) * 8
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            entries = os.pread(fd, n, first * 8)
        finally:
            os.close(fd)
    except OSError:
        return False
    if len(entries) != n:
        return False
    return b"\x01" not in entries[7::8].translate(_CHANGED)


# -- lifetime ---------------------------------------------------------------------------


def segment_names(data: bytes | bytearray | memoryview | None) -> list[str]:
    """Every segment ``data`` names: those it owns first, then those it borrows."""
    if data is None or not has_segments(data):
        return []
    owned = _owned(data)
    at = len(_HEAD) + 5 + _U32.unpack_from(data, len(_HEAD) + 1)[0] + 1
    (n,) = _U64.unpack_from(data, at)
    segments = pickle.loads(bytes(data[at + 8 : at + 8 + n]))[0]
    return owned + [name for name, _, _ in segments if name not in owned]


def has_segments(data: bytes | bytearray | memoryview | None) -> bool:
    """Whether ``data`` is a message that names segments (a test of its first bytes)."""
    return data is not None and data[: len(_HEAD)] == _HEAD


def _owned(data: bytes | bytearray | memoryview | None) -> list[str]:
    if data is None or data[: len(_HEAD)] != _HEAD:
        return []
    (n,) = _U32.unpack_from(data, len(_HEAD) + 1)
    start = len(_HEAD) + 5
    return bytes(data[start : start + n]).decode().split()


def release(data: bytes | bytearray | memoryview | None) -> None:
    """Unlink the segments ``data`` owns (for ordinary data, a cheap no-op).

    Idempotent. Objects already loaded from them stay valid; loading ``data``
    afterwards fails. Segments ``data`` only borrows are left to their owner.
    """
    if data is None or data[: len(_HEAD)] != _HEAD:
        return
    for name in _owned(data):
        _unlink(name)


def segment_prefix(pid: int) -> str:
    """The start of the names of the segments that process ``pid`` creates.

    ``pid`` is one of this pid namespace, and the namespace is part of the
    name: processes of another container that shares ``/dev/shm`` (whose pids
    mean other processes) are left alone.
    """
    return f"{NAME_PREFIX}{pid}-{_namespace():x}-"


def _namespace() -> int:
    global _pid_namespace
    if _pid_namespace is None:
        try:
            _pid_namespace = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            _pid_namespace = 0
    return _pid_namespace


def release_leftovers(pid: int) -> None:
    """Unlink every segment that process ``pid`` created and nobody released.

    For a worker that died (or was stopped) before its results were received:
    call it once that worker has exited and its pipe has been read to the end.
    """
    prefix = segment_prefix(pid)
    for name in _listdir():
        if name.startswith(prefix):
            _unlink(name)
    _unlink(f"{FAULT_PREFIX}{pid}-{_namespace():x}")


def fault_path(pid: int) -> str | None:
    """The file where worker ``pid``'s faulthandler writes a crash's tracebacks,
    for the parent to read when the worker dies (None: no ``/dev/shm``).

    ``release_leftovers(pid)`` removes it with the worker's segments;
    ``sweep_stale`` removes it once that worker is long gone.
    """
    if not available():
        return None
    return os.path.join(SHM_DIR, f"{FAULT_PREFIX}{pid}-{_namespace():x}")


def sweep_stale(min_age: float = 60.0) -> None:
    """Unlink segments left by processes that no longer exist (a parent killed by SIGKILL).

    Only segments older than ``min_age`` seconds whose creator is gone; those
    of other users are not ours to remove (``/dev/shm`` is sticky).
    """
    now = time.time()
    namespace = f"{_namespace():x}"
    for name in _listdir():
        fields = name[len(NAME_PREFIX) :].split("-")
        if fields[0] == "fault":  # a worker's fault file: fault-<pid>-<namespace>
            fields = [*fields[1:], ""]
        if len(fields) != 3 or fields[1] != namespace or not fields[0].isdigit():
            continue  # another container's (or not ours at all)
        pid = int(fields[0])
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            if now - os.stat(os.path.join(SHM_DIR, name)).st_mtime < min_age:
                continue
        except OSError:
            continue
        _unlink(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, another user's
    return True


def _listdir() -> list[str]:
    try:
        return [n for n in os.listdir(SHM_DIR) if n.startswith(NAME_PREFIX)]
    except OSError:
        return []


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except OSError:
        pass


def _hook_exit() -> None:
    """At exit, remove what this process created and still owns (once per process)."""
    global _exit_hook_pid
    pid = os.getpid()
    if _exit_hook_pid == pid:
        return
    with _lock:
        if _exit_hook_pid != pid:
            _exit_hook_pid = pid
            atexit.register(_at_exit, pid)


def _at_exit(pid: int) -> None:
    if os.getpid() != pid:
        return  # a forked child that inherited the hook: not its segments
    try:
        # Pools still open drain first (their queued jobs need their segments).
        procstart: Any = sys.modules.get("parfn.backends.process._start")
        if procstart is not None:
            procstart.shutdown_all_pools()
    finally:
        release_leftovers(pid)
