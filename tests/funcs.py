"""Module-level functions the tests send to workers (importable by every start method)."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

import parfn
from parfn import parallel


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


def identity(x: Any) -> Any:
    return x


def pid(_: object = None) -> int:
    return os.getpid()


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def fail_on(x: int, bad: int = 3) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def raise_key_error(key: str) -> None:
    raise KeyError(key)


def in_worker(_: object = None) -> bool:
    return parfn.in_worker()


def crash(how: str) -> None:
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(3)
    elif how == "segfault":
        ctypes.string_at(0)
    time.sleep(60)


def crash_on(x: int, bad: int = 3, how: str = "exit") -> int:
    if x == bad:
        crash(how)
    return x


def slow_on(x: int, bad: int = 3, seconds: float = 30) -> int:
    if x == bad:
        time.sleep(seconds)
    return x


def _count_call(path: str) -> int:
    """How many times this was called before, counted in a file (across processes)."""
    with open(path, "a+") as f:
        f.seek(0)
        count = len(f.read())
        f.write("x")
    return count


def fail_first_times(path: str, times: int) -> str:
    """Raise until called ``times`` times."""
    count = _count_call(path)
    if count < times:
        raise RuntimeError(f"attempt {count + 1} fails")
    return f"ok after {count + 1}"


def crash_first_times(path: str, times: int) -> str:
    """Kill its worker (exit code 7) until called ``times`` times."""
    count = _count_call(path)
    if count < times:
        os._exit(7)
    return f"ok after {count + 1}"


@parallel
def cube(x: int) -> int:
    return x * x * x


@parallel
def nested_sum(n: int) -> int:
    """Calls another decorated function from inside a worker."""
    return sum(cube.map(range(n))) + cube.apply(2) + cube.spawn(1).result(timeout=10)


@parallel(timeout=0.5)
def slow_cube(x: int) -> int:
    time.sleep(5)
    return x


def initializer_sets(value: str) -> None:
    os.environ["PARFN_TEST_INIT"] = value


def read_init(_: object = None) -> str | None:
    return os.environ.get("PARFN_TEST_INIT")


def failing_initializer() -> None:
    raise RuntimeError("initializer failed")


def ppid(_: object = None) -> int:
    return os.getppid()


class Holder:
    """An object whose bound method is a task (references to it must not outlive the task)."""

    def method(self, x: int) -> int:
        return x + 1
