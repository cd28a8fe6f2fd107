"""Task functions for the tests of what workers log and print, importable by workers."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from typing import Any

from parfn import parallel

log = logging.getLogger("tests.observe")


def log_and_return(x: int) -> int:
    log.warning("warning %d", x)
    return x


def log_levels(x: int) -> tuple[int, bool, bool]:
    """Log at three levels; whether this worker's logger would make DEBUG and INFO records."""
    log.debug("debug %d", x)
    log.info("info %d", x)
    log.warning("warning %d", x)
    return os.getpid(), log.isEnabledFor(logging.DEBUG), log.isEnabledFor(logging.INFO)


def log_exception(_: object = None) -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("it failed")


def log_extra(_: object = None) -> int:
    log.warning("with extra", extra={"user_field": 42, "unpicklable": lambda: 1})
    return os.getpid()


def log_then_exit(code: int) -> None:
    log.error("last words before exit %d", code)
    print("stderr before exit", file=sys.stderr)
    os._exit(code)


def log_then_segfault(_: object = None) -> None:
    log.error("last words before a segfault")
    print("stderr before a segfault", file=sys.stderr)
    ctypes.string_at(0)


def segfault_on(x: int, bad: int = 5) -> int:
    if x == bad:
        ctypes.string_at(0)
    return x


def print_lines(tag: str, n: int, width: int) -> int:
    """Print ``n`` lines of ``width`` times ``tag``, each in several writes."""
    for _ in range(n):
        print(tag * (width // 2), end="")
        print(tag * (width - width // 2))
    return n


def print_partial(text: str) -> str:
    print(text, end="")
    return text


def print_both(x: int) -> int:
    print(f"out {x}")
    print(f"err {x}", file=sys.stderr)
    return x


def stream_facts(_: object = None) -> tuple[int, int, str]:
    sys.stdout.buffer.write(b"bytes line\n")
    sys.stdout.flush()
    return sys.stdout.fileno(), sys.stderr.fileno(), sys.stdout.encoding


def flood(records: int, lines: int, width: int) -> int:
    for i in range(records):
        log.warning("record %d", i)
    text = "x" * width
    for i in range(lines):
        print(f"{i} {text}")
    return records + lines


def fork_and_print(_: object = None) -> str:
    """Fork a child that logs and prints (it must not write to the worker's pipe)."""
    pid = os.fork()
    if pid == 0:
        try:
            log.warning("from the grandchild")
            print("grandchild prints")
            sys.stdout.flush()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    log.warning("from the worker after its fork")
    return "forked"


def sleep_log(seconds: float) -> float:
    time.sleep(seconds)
    log.warning("slept %s", seconds)
    return seconds


def init_logs(message: str) -> None:
    logging.getLogger("tests.observe.init").info(message)


@parallel
def inner_logs(x: int) -> int:
    logging.getLogger("tests.observe.inner").warning("inner %d", x)
    return x


@parallel
def outer_logs(n: int) -> int:
    """Calls another decorated function, which logs, from inside a worker."""
    logging.getLogger("tests.observe.outer").warning("outer %d", n)
    return sum(inner_logs.map(range(n)))


def raise_value_error(x: int) -> int:
    raise ValueError(x)


def identity(x: Any) -> Any:
    return x


_kept: list[bytearray] = []


def hold(mib: int, seconds: float) -> int:
    """Hold ``mib`` MiB (written: resident) for ``seconds``."""
    block = bytearray(b"x") * (mib << 20)
    time.sleep(seconds)
    return len(block) >> 20


def keep(mib: int) -> int:
    """Keep ``mib`` MiB more in this worker (written: resident)."""
    _kept.append(bytearray(b"x") * (mib << 20))
    return len(_kept)
