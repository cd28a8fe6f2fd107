"""Framed I/O on the two ends of a worker's pipe.

Frames are those of ``multiprocessing.connection.Connection`` (a 4-byte
big-endian length, or -1 and an 8-byte length). The parent's end
(``Channel``) is non-blocking, so that the manager thread never blocks on a
worker; the worker's end (``Reader``) blocks, and one ``read`` takes in
every frame already sent: one system call per message, where
``Connection.recv_bytes`` needs two (and a ``poll`` to look for more).
"""

from __future__ import annotations

import os
import select
import struct
import threading
from collections import deque
from collections.abc import Iterable

from ..._typing import Any

__all__ = ("Channel", "Reader", "write_frame")

_HEADER = struct.Struct("!i")
_READ_SIZE = 1 << 16
"""Bytes asked of one ``os.read``: a pipe holds 64 KiB, and a larger request
costs a fresh memory mapping per call (~13 us, against <1 us for this size)."""
_LONG_HEADER = struct.Struct("!Q")


def _frame(data: bytes) -> bytes:
    """Frame ``data`` as ``multiprocessing.connection.Connection`` does."""
    return _header(len(data)) + data


def _bounds(buf: bytearray, pos: int) -> tuple[int, int]:
    """The frame at ``pos``: ``(start, end)`` of its data, or ``(-1, end)``
    while its header is incomplete, ``end`` being where the header ends."""
    if len(buf) - pos < 4:
        return -1, pos + 4
    n: int = _HEADER.unpack_from(buf, pos)[0]
    if n != -1:
        return pos + 4, pos + 4 + n
    if len(buf) - pos < 12:
        return -1, pos + 12
    n = _LONG_HEADER.unpack_from(buf, pos + 4)[0]
    return pos + 12, pos + 12 + n


def _split(buf: bytearray) -> list[bytes]:
    """Take the complete frames off the front of ``buf``."""
    frames: list[bytes] = []
    pos = 0
    with memoryview(buf) as view:  # one copy of each frame, not two
        while True:
            start, end = _bounds(buf, pos)
            if start < 0 or end > len(buf):
                break
            frames.append(view[start:end].tobytes())
            pos = end
    if pos:
        del buf[:pos]
    return frames


def _missing(buf: bytearray) -> int:
    """How many more bytes the frame at the front of ``buf`` needs (at least 1)."""
    return _bounds(buf, 0)[1] - len(buf)


_write_lock = threading.Lock()
"""A worker's loop and the threads that forward its logs and prints
(``parfn._wire.capture``) write whole frames, one at a time."""


def write_frame(fd: int, data: bytes) -> None:
    """Write one frame to a blocking ``fd`` (the worker's end); any thread."""
    with _write_lock:
        if len(data) < _READ_SIZE:
            _write_all(fd, memoryview(_frame(data)))
        else:  # big: no copy of the data to put the header in front
            _write_all(fd, memoryview(_header(len(data))))
            _write_all(fd, memoryview(data))


def _header(n: int) -> bytes:
    if n > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _LONG_HEADER.pack(n)
    return _HEADER.pack(n)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


class Reader:
    """Blocking framed reads on the worker's end of its pipe.

    ``read(wait=True)`` blocks until at least one frame is complete and
    returns every complete frame; ``read(wait=False)`` returns at once, with
    the frames already sent (a partial one is waited for). Raises EOFError
    when the pipe reaches its end.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def read(self, wait: bool = True) -> list[bytes]:
        buf = self.buf
        if not wait and not buf and not self._poll.poll(0):
            return []
        while True:
            missing = _missing(buf)
            if missing > _READ_SIZE:  # a big frame: read the rest of it in place
                start = len(buf)
                buf += bytes(missing)
                self._read_into(memoryview(buf)[start:])
            else:
                data = os.read(self.fd, _READ_SIZE)
                if not data:
                    raise EOFError
                buf += data
            frames = _split(buf)
            if frames:
                return frames

    def _read_into(self, view: memoryview) -> None:
        try:
            while view:
                n = os.readv(self.fd, [view])
                if not n:
                    raise EOFError
                view = view[n:]
        finally:
            view.release()  # the buffer can be resized again, whatever happened


class Channel:
    """Non-blocking framed I/O on the parent's end of a worker's pipe.

    Callers hold the pool's ``_lock`` for ``send``/``flush``; only the
    manager thread reads.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.fd: int = conn.fileno()
        os.set_blocking(self.fd, False)
        self.inbuf = bytearray()
        self.out: deque[memoryview] = deque()

    def send(self, frames: Iterable[bytes]) -> None:
        data = b"".join(_frame(f) for f in frames)
        if self.out:
            self.out.append(memoryview(data))
            return
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError:
            return  # the worker is gone; its sentinel will tell the manager
        if n < len(data):
            self.out.append(memoryview(data)[n:])

    def flush(self) -> None:
        while self.out:
            chunk = self.out[0]
            try:
                n = os.write(self.fd, chunk)
            except BlockingIOError:
                return
            except OSError:
                self.out.clear()
                return
            if n < len(chunk):
                self.out[0] = chunk[n:]
                return
            self.out.popleft()

    def read(self) -> tuple[list[bytes], bool]:
        """Complete frames now readable, and whether the pipe reached its end."""
        eof = False
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not data:
                eof = True
                break
            self.inbuf += data
            if len(data) < _READ_SIZE:
                break
        return _split(self.inbuf), eof

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:  # pragma: no cover
            pass
