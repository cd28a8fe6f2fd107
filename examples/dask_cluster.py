"""The same @parallel code on a Dask cluster, started here as separate processes.

    pip install 'parfn[dask]'
    python examples/dask_cluster.py

It starts a scheduler and two workers the way you would on real machines
(``dask scheduler``, ``dask worker``), here all on 127.0.0.1 with no
dashboard, connects to the scheduler by address, runs a map and a task that
fails, prints what the caller got, and stops every process it started, also
when something goes wrong. On a real cluster you would only write the
``with parfn.Pool(backend="dask", address=...)`` block.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import parfn
from parfn import parallel


@parallel
def square(x: int) -> int:
    return x * x


@parallel(retries=1)
def divide(a: float, b: float) -> float:
    return a / b


def dask_command(*args: str) -> list[str]:
    """``dask ...`` run with this Python, so the workers can import parfn too."""
    return [sys.executable, "-m", "dask", *args]


@contextmanager
def local_cluster(workers: int = 2) -> Iterator[str]:
    """Start ``dask scheduler`` and ``workers`` x ``dask worker``; yield the address."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="parfn-example-") as tmp:
        scheduler_file = os.path.join(tmp, "scheduler.json")
        log = open(os.path.join(tmp, "dask.log"), "wb")  # the processes' own logging
        common = {
            "start_new_session": True,  # each its own process group: see stop()
            "stdout": log,
            "stderr": log,
        }
        try:
            procs.append(
                subprocess.Popen(
                    dask_command(
                        "scheduler",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "0",  # a free port, written to the scheduler file
                        "--no-dashboard",
                        "--dashboard-address",
                        "127.0.0.1:0",  # its HTTP server: not 8787
                        "--scheduler-file",
                        scheduler_file,
                        "--idle-timeout",
                        "300s",  # a safety net if this script is killed
                    ),
                    **common,  # type: ignore[call-overload]
                )
            )
            address = wait_for_address(scheduler_file, procs[0])
            for _ in range(workers):
                procs.append(
                    subprocess.Popen(
                        dask_command(
                            "worker",
                            address,
                            "--host",
                            "127.0.0.1",
                            "--nthreads",
                            "1",
                            "--no-dashboard",
                            "--death-timeout",
                            "60s",  # exit if the scheduler goes away
                        ),
                        **common,  # type: ignore[call-overload]
                    )
                )
            wait_for_workers(address, workers)
            yield address
        except BaseException:
            log.flush()
            with open(log.name, "rb") as f:
                tail = f.read()[-3000:].decode(errors="replace")
            print(f"--- the end of the dask processes' log:\n{tail}", file=sys.stderr)
            raise
        finally:
            for proc in reversed(procs):
                stop(proc)
            log.close()


def wait_for_address(scheduler_file: str, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with code {proc.returncode}")
        try:
            with open(scheduler_file) as f:
                return str(json.load(f)["address"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)  # not written yet
    raise TimeoutError("dask scheduler did not start within 60 s")


def wait_for_workers(address: str, n: int) -> None:
    import distributed

    with distributed.Client(address, set_as_default=False) as client:
        client.wait_for_workers(n, timeout=60)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a dask process and its children (a worker's nanny starts one)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Anything left in its process group (a worker whose nanny is gone):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    with local_cluster(workers=2) as address:
        print(f"scheduler at {address}, 2 workers")
        with parfn.Pool(backend="dask", address=address) as pool:
            print(f"pool: {pool}")
            squares = square.map(range(10))
            print(f"square.map(range(10)) -> {squares}")
            try:
                divide.apply(1, 0)
            except ZeroDivisionError as exc:
                print(f"divide.apply(1, 0) raised {type(exc).__name__}: {exc}")
                print(f"  with the worker's traceback as its cause:{exc.__cause__}")
            results = divide.map([1, 2, 3], [1, 0, 3], return_exceptions=True)
            print(f"divide.map(..., return_exceptions=True) -> {results!r}")
    print("scheduler and workers stopped")


if __name__ == "__main__":
    main()
