"""Run ONE measurement (one workload, one system, one repetition) and write it as JSON.

``run.py`` starts this script in a fresh process, in a session of its own, under a
hard time cap, and kills the whole process group afterwards: a system that hangs
or eats memory cannot take the harness down with it.

    python _driver.py '<spec as JSON>' OUT.json

The spec is ``{"workload": ..., "system": ..., "params": {...}}``. ``system`` is a
name from ``_systems.SYSTEMS`` or ``"floor"``, the machine's own floor for that
workload (pipe ping-pong, memcpy, serial run, bare interpreter start).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import _systems
from _systems import NotApplicable, System
from _workloads import burn, echo, linalg, matmul, nap, noop, numpy_nap, pipe_echo_server

Result = dict[str, Any]


def _write(path: str, result: Result) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def _ok(samples: list[float], unit: str, **extra: Any) -> Result:
    return {"status": "ok", "unit": unit, "samples": samples, "extra": extra}


def _warm(system: System) -> None:
    """Start every worker (lazy pools start them on demand) and prime the call path."""
    with contextlib.suppress(NotApplicable):
        system.map(nap, [0.05] * (2 * _systems.WORKERS), 1)
    with contextlib.suppress(NotApplicable):
        for _ in range(20):
            system.apply(noop, 1)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- the workloads, for a pool-based system ------------------------------------


def latency(system: System, p: dict[str, Any]) -> Result:
    deadline = time.perf_counter() + p["budget_s"] / 4
    for i in range(p["warmup"]):
        system.apply(noop, 1)
        if i >= 10 and time.perf_counter() > deadline:
            break
    times: list[int] = []
    clock = time.perf_counter_ns
    deadline = time.perf_counter() + p["budget_s"]
    for _ in range(p["calls"]):
        t0 = clock()
        r = system.apply(noop, 1)
        times.append(clock() - t0)
        assert r == 1
        if len(times) >= 20 and time.perf_counter() > deadline:
            break  # a slow system: fewer calls, but a bounded time
    return _latency_result(times)


def _latency_result(times_ns: list[int]) -> Result:
    q = statistics.quantiles(times_ns, n=100)
    return _ok(
        [statistics.median(times_ns) / 1e3], "us", p90_us=q[89] / 1e3, p99_us=q[98] / 1e3,
        calls=len(times_ns),
    )  # fmt: skip


def spawn(system: System, p: dict[str, Any]) -> Result:
    n = p["tasks"]
    t0 = time.perf_counter()
    handles = [system.spawn(noop, i) for i in range(n)]
    t_submitted = time.perf_counter()
    out = system.gather(handles)
    t1 = time.perf_counter()
    assert out == list(range(n)), "wrong results"
    return _ok([n / (t1 - t0)], "tasks/s", submit_s=t_submitted - t0, total_s=t1 - t0)


def mapping(system: System, p: dict[str, Any]) -> Result:
    items = list(range(p["items"]))
    t0 = time.perf_counter()
    out = system.map(noop, items, p["chunksize"])
    t1 = time.perf_counter()
    assert out == items, "wrong results"
    return _ok([len(items) / (t1 - t0)], "items/s", total_s=t1 - t0)


def cpu(system: System, p: dict[str, Any]) -> Result:
    items = [p["iterations"]] * p["tasks"]
    t0 = time.perf_counter()
    out = system.map(burn, items, None)
    t1 = time.perf_counter()
    assert len(out) == len(items) and len(set(out)) == 1, "wrong results"
    return _ok([t1 - t0], "s")


def numpy_batch(system: System, p: dict[str, Any]) -> Result:
    items = [p["n"]] * p["tasks"]
    system.map(matmul, items[:2], 1)  # warm-up: imports numpy in the workers
    t0 = time.perf_counter()
    out = system.map(matmul, items, None)
    t1 = time.perf_counter()
    assert len(out) == len(items) and len(set(out)) == 1, "wrong results"
    return _ok([t1 - t0], "s")


def _linalg_tasks(p: dict[str, Any]) -> list[tuple[int, int]]:
    return [(seed, p["n"]) for seed in range(p["tasks"])]


def linalg_map(system: System, p: dict[str, Any]) -> Result:
    """The linalg tasks through ``map``, once every worker has imported numpy."""
    system.map(numpy_nap, [0.05] * (2 * _systems.WORKERS), 1)
    system.map(linalg, [(seed, 32) for seed in range(2 * _systems.WORKERS)], 1)
    tasks = _linalg_tasks(p)
    t0 = time.perf_counter()
    out = system.map(linalg, tasks, None)
    elapsed = time.perf_counter() - t0
    assert len(out) == len(tasks) and math.isclose(out[0], linalg(tasks[0]), rel_tol=1e-6)
    return _ok([elapsed], "s")


def _big_array(p: dict[str, Any]) -> Any:
    import numpy as np

    return np.random.default_rng(0).random(p["mib"] * 2**20 // 8)


def array(system: System, p: dict[str, Any]) -> Result:
    arr = _big_array(p)
    system.apply(echo, arr)  # warm-up: imports numpy in the worker
    samples = []
    writable = True
    for _ in range(p["round_trips"]):
        t0 = time.perf_counter()
        out = system.apply(echo, arr)
        samples.append((time.perf_counter() - t0) * 1e3)
        assert out.shape == arr.shape and out[0] == arr[0] and out[-1] == arr[-1]
        writable = writable and bool(out.flags.writeable)
        del out
    return _ok(samples, "ms", writable=writable)


def imap(system: System, p: dict[str, Any]) -> Result:
    """Consume ``imap`` over ``itertools.count()`` for a while, then pause and watch the input.

    A bounded imap stops pulling input while its consumer pauses; an unbounded one
    keeps reading (and its memory grows); one that never yields blocks in the call.
    The consumer runs in a thread, so a system stuck in its imap call cannot stop
    the measurement: the driver reports and leaves with ``os._exit``.
    """
    pulled = 0
    yielded = 0
    go = threading.Event()
    go.set()
    call_returned = threading.Event()

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled = i + 1
            yield i

    def consume() -> None:
        nonlocal yielded
        it = system.imap(noop, endless())
        call_returned.set()
        for x in it:
            if x != yielded:
                raise AssertionError(f"item {yielded} came back as {x}")
            yielded += 1
            if not go.is_set():
                go.wait()

    errors: list[str] = []

    def guarded() -> None:
        try:
            consume()
        except NotApplicable:
            errors.append("n/a")
        except BaseException:
            errors.append(traceback.format_exc(limit=3))

    rss0 = _rss()
    limit = p["memory_limit_mib"] * 2**20
    t0 = time.perf_counter()
    threading.Thread(target=guarded, daemon=True).start()
    memory_hit = False

    def watch(until: float) -> None:
        nonlocal memory_hit
        while time.perf_counter() < until and not errors:
            if _rss() - rss0 > limit:
                memory_hit = True
                return
            time.sleep(0.02)

    watch(t0 + p["run_s"])
    run_s = time.perf_counter() - t0
    yielded_run = yielded
    go.clear()
    pause_start = time.perf_counter()
    if not memory_hit:
        watch(pause_start + p["settle_s"])
    pulled_settled = pulled
    if not memory_hit:
        watch(time.perf_counter() + p["pause_s"])
    pulled_end, yielded_end = pulled, yielded
    growth = pulled_end - pulled_settled
    bounded = not memory_hit and growth <= p["growth_tolerance"]
    if errors:
        return {"status": "n/a"} if errors[0] == "n/a" else {"status": "error", "error": errors[0]}
    return _ok(
        [yielded_run / run_s] if yielded_run else [],
        "items/s",
        yielded=yielded_run,
        call_returned=call_returned.is_set(),
        bounded=bounded,
        memory_guard_hit=memory_hit,
        ahead=pulled_end - yielded_end,
        pulled=pulled_end,
        pulled_during_pause=growth,
        pause_s=time.perf_counter() - pause_start,
        rss_growth_mib=(_rss() - rss0) / 2**20,
    )


def as_script(code: str) -> str:
    """A system's cold-start code as a user's script: its own function, not ``abs``,
    called under the ``__main__`` guard."""
    body = textwrap.indent(code.replace("abs", "neg"), "    ")
    return f"def neg(x):\n    return -x\n\n\nif __name__ == '__main__':\n{body}"


def cold(code: str, p: dict[str, Any], script: bool = False) -> Result:
    """Start ``python -c code`` (or, with ``script``, ``python script.py`` of
    ``as_script(code)``) ``starts`` times: the wall time of each, to its exit."""
    argv = [sys.executable, "-c", code]
    if script:
        path = os.path.join(tempfile.mkdtemp(prefix="parfn-bench-"), "script.py")
        with open(path, "w") as f:
            f.write(as_script(code))
        argv = [sys.executable, path]
    samples = []
    for _ in range(p["starts"]):
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            _, err = proc.communicate(timeout=p["cap_s"])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return {"status": "error", "error": f"cold start took over {p['cap_s']} s"}
        samples.append((time.perf_counter() - t0) * 1e3)
        if proc.returncode != 0:
            return {"status": "error", "error": err.decode(errors="replace")[-500:]}
        _let_leftovers_exit(proc.pid)
    return _ok(samples, "ms")


def _let_leftovers_exit(group: int, cap_s: float = 5.0) -> None:
    """Wait until no process of the start's session is left (workers some
    peers leave to exit after their parent): the next start, of whichever
    system, must not share the CPUs with them. (They are not this process's
    children: nothing to wait on but the group's existence.)"""
    deadline = time.monotonic() + cap_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.005)


POOL_WORKLOADS: dict[str, Callable[[System, dict[str, Any]], Result]] = {
    "latency": latency,
    "spawn": spawn,
    "map": mapping,
    "map1": mapping,
    "cpu": cpu,
    "numpy": numpy_batch,
    "array": array,
    "imap": imap,
    "linalg": linalg_map,
}


# -- the floors ------------------------------------------------------------------


def floor_latency(p: dict[str, Any]) -> Result:
    """Round trips of a small pickled message over a ``multiprocessing.Pipe``."""
    import multiprocessing

    here, there = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=pipe_echo_server, args=(there,), daemon=True)
    proc.start()
    msg: tuple[str, tuple[int], dict[str, int]] = ("noop", (1,), {})
    for _ in range(p["warmup"]):
        here.send(msg)
        here.recv()
    times = []
    clock = time.perf_counter_ns
    for _ in range(p["calls"]):
        t0 = clock()
        here.send(msg)
        here.recv()
        times.append(clock() - t0)
    here.send(None)
    proc.join(5)
    return _latency_result(times)


def floor_array(p: dict[str, Any]) -> Result:
    """``np.copyto`` of the array into a preallocated, already touched array: a memcpy."""
    import numpy as np

    arr = _big_array(p)
    dst = np.empty_like(arr)
    np.copyto(dst, arr)
    samples = []
    for _ in range(max(5, p["round_trips"])):
        t0 = time.perf_counter()
        np.copyto(dst, arr)
        samples.append((time.perf_counter() - t0) * 1e3)
    return _ok(samples, "ms")


def floor_cpu(p: dict[str, Any]) -> Result:
    """The same tasks run one after another in this process: the serial time."""
    t0 = time.perf_counter()
    for _ in range(p["tasks"]):
        burn(p["iterations"])
    return _ok([time.perf_counter() - t0], "s")


class _BuiltinMap(System):
    """The builtin ``map``, lazy, in this process: what the imap consumer alone can take."""

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return map(fn, items)


def floor_imap(p: dict[str, Any]) -> Result:
    """The imap workload's own consumer and input over the builtin ``map``: its ceiling."""
    return imap(_BuiltinMap(), p)


def floor_linalg(p: dict[str, Any]) -> Result:
    """The same tasks one after another in this process, numpy's BLAS using every CPU."""
    linalg((0, 32))
    tasks = _linalg_tasks(p)
    t0 = time.perf_counter()
    for task in tasks:
        linalg(task)
    return _ok([time.perf_counter() - t0], "s")


FLOORS: dict[str, Callable[[dict[str, Any]], Result]] = {
    "latency": floor_latency,
    "array": floor_array,
    "cpu": floor_cpu,
    "imap": floor_imap,
    "cold": lambda p: cold("pass", p),
    "script": lambda p: cold("pass", p),
    "linalg": floor_linalg,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    workload, name, params = spec["workload"], spec["system"], spec["params"]
    if name == "floor":
        floor = FLOORS.get(workload)
        _write(out_path, floor(params) if floor else {"status": "n/a"})
        return
    if workload in ("cold", "script"):
        _write(out_path, cold(_systems.SYSTEMS[name].cold_code, params, workload == "script"))
        return
    if workload == "linalg":
        import numpy  # noqa: F401  (as a user's script does, before its pool starts)
    system = _systems.make(name)
    t0 = time.perf_counter()
    system.start()
    _warm(system)
    start_s = time.perf_counter() - t0
    try:
        result = POOL_WORKLOADS[workload](system, params)
    except NotApplicable:
        result = {"status": "n/a"}
    result.setdefault("extra", {})["start_s"] = start_s
    _write(out_path, result)
    if workload == "imap":
        # The pool may be stuck feeding an endless input: leave without shutting it
        # down; run.py kills the process group.
        sys.stdout.flush()
        os._exit(0)
    t0 = time.perf_counter()
    system.close()
    result["extra"]["close_s"] = time.perf_counter() - t0
    _write(out_path, result)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        _write(sys.argv[2], {"status": "error", "error": traceback.format_exc(limit=4)})
        # A broken pool may hang the interpreter's exit: leave now; run.py kills the rest.
        os._exit(1)
