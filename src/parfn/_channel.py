"""The parent's end of a worker's pipe: non-blocking, framed I/O.

Frames are those of ``multiprocessing.connection.Connection`` (a 4-byte
big-endian length, or -1 and an 8-byte length), so the worker reads and
writes its end with the ordinary blocking ``recv_bytes``/``send_bytes``,
while the parent's manager thread never blocks on a worker.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Iterable
from typing import Any

__all__ = ("Channel",)

_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")


def _frame(data: bytes) -> bytes:
    """Frame ``data`` as ``multiprocessing.connection.Connection`` does."""
    n = len(data)
    if n > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _LONG_HEADER.pack(n) + data
    return _HEADER.pack(n) + data


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
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not data:
                eof = True
                break
            self.inbuf += data
            if len(data) < (1 << 20):
                break
        frames: list[bytes] = []
        buf, pos, end = self.inbuf, 0, len(self.inbuf)
        while end - pos >= 4:
            (n,) = _HEADER.unpack_from(buf, pos)
            start = pos + 4
            if n == -1:
                if end - start < 8:
                    break
                (n,) = _LONG_HEADER.unpack_from(buf, start)
                start += 8
            if end - start < n:
                break
            frames.append(bytes(buf[start : start + n]))
            pos = start + n
        if pos:
            del buf[:pos]
        return frames, eof

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:  # pragma: no cover
            pass
