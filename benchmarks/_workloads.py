"""The functions the benchmark workloads run in worker processes.

They live in a module of their own (not in ``__main__``) so that every system,
including those that pickle functions by reference only, can send them to a
worker. This module imports nothing heavy: numpy is imported by the caller
only when a workload needs it.
"""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any, TypeVar

T = TypeVar("T")


def noop(x: T) -> T:
    """Return the argument: the trivial task of the latency and throughput workloads."""
    return x


def echo(x: T) -> T:
    """Return the argument unchanged (the 64 MiB array workload)."""
    return x


def nap(seconds: float) -> float:
    """Sleep, so that a warm-up batch forces every worker of a lazy pool to start."""
    time.sleep(seconds)
    return seconds


def burn(iterations: int) -> int:
    """Pure-Python CPU work: a loop that holds the GIL for ``iterations`` steps."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def matmul(n: int) -> float:
    """numpy work: the product of an ``n`` x ``n`` matrix with itself (BLAS threads)."""
    import numpy as np

    a = np.random.default_rng(n).random((n, n))
    return float((a @ a).trace())


def numpy_nap(seconds: float) -> float:
    """Import numpy, then sleep: a warm-up that reaches every worker of a lazy pool."""
    import numpy  # noqa: F401

    time.sleep(seconds)
    return seconds


def linalg(task: tuple[int, int]) -> float:
    """Numerical work: matrix products and a symmetric eigen-solve, ``(seed, n)``.

    Each step runs in BLAS/LAPACK, whose threads (one per CPU unless capped)
    are what the linalg workload measures. numpy is imported here, in the
    worker, as a task's module would.
    """
    import numpy as np

    seed, n = task
    a = np.random.default_rng(seed).standard_normal((n, n))
    b = a @ a.T / n
    for _ in range(3):
        b = b @ a / n
    return float(np.linalg.eigvalsh(b + b.T)[-1])


def calibrate_burn(seconds: float, probe: int = 200_000) -> int:
    """How many :func:`burn` iterations take about ``seconds`` here (best of 3 probes)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        burn(probe)
        best = min(best, time.perf_counter() - t0)
    return max(1, int(probe * seconds / best))


def pipe_echo_server(conn: Connection) -> None:
    """Echo every message back until ``None`` arrives (the pipe ping-pong floor)."""
    while True:
        msg: Any = conn.recv()
        if msg is None:
            break
        conn.send(msg)
    conn.close()
