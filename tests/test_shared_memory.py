"""Big buffers through shared memory: correct, writable, and never leaked.

Through the public API on every start method (``process_pool``), then the
``_shm`` module on its own. A segment is a file
``/dev/shm/parfn-<pid>-<namespace>-<random>``; the tests look only at the
segments of this process and of the workers that ran their functions (each
function logs its pid), so that other test runs on the machine do not
disturb them.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import parfn
from parfn._wire import shm as _shm
from parfn._wire.errors import SerializationError
from parfn._wire.serialize import dumps, loads

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.skipif(not _shm.available(), reason="needs a writable /dev/shm")

T = 30
MiB = 1 << 20


# -- helpers -----------------------------------------------------------------------------


def segments_of(pids: Iterable[int]) -> list[str]:
    prefixes = tuple(_shm.segment_prefix(pid) for pid in pids)
    return sorted(n for n in os.listdir(_shm.SHM_DIR) if n.startswith(prefixes))


def worker_pids(log: Path) -> set[int]:
    return {int(x) for x in log.read_text().split()} if log.exists() else set()


def assert_no_segments(log: Path | None = None, wait: float = 10.0) -> None:
    """No segment of this process or of the logged workers is left (within ``wait`` s).

    The parent releases an argument segment when the job is done with, which
    may be a moment after its result reached the caller: hence the wait.
    """
    pids = {os.getpid(), *(worker_pids(log) if log else ())}
    deadline = time.monotonic() + wait
    while True:
        gc.collect()
        left = segments_of(pids)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"shared-memory segments leaked: {left}"


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pids"
    yield path
    assert_no_segments(path)


def run(pool: parfn.Pool, fn: Any, *args: Any) -> Any:
    return pool.spawn(fn, *args).result(timeout=T)


def _log(log: str) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")


# -- functions the workers run (module level: sent by reference) -----------------------------


def echo(x: Any, log: str) -> Any:
    _log(log)
    return x


def double(x: Any, log: str) -> Any:
    _log(log)
    if isinstance(x, dict):
        return {k: double(v, log) for k, v in x.items()}
    return x * 2


def touch_then_return(arr: Any, log: str) -> Any:
    _log(log)
    arr[0] += 1  # one page written: the array cannot go back by reference
    return arr


def first_and_last_half(arr: Any, log: str) -> Any:
    _log(log)
    return arr[len(arr) // 2 :]


def bytes_info(b: bytes, ba: bytearray, log: str) -> tuple[int, int, bytes, bytearray]:
    _log(log)
    ba[0] = 7
    return len(b), len(ba), b[::-1], ba


def fail_with(arr: Any, log: str) -> None:
    _log(log)
    raise ValueError(f"bad array of {arr.nbytes} bytes")


def sleep_with(arr: Any, log: str) -> None:
    _log(log)
    time.sleep(60)


def die_holding_a_result(arr: Any, log: str) -> None:
    """Pickle a big result into shared memory, as a worker does, then die at once."""
    _log(log)
    data = dumps(arr * 2, shm="one")
    assert _shm.has_segments(data)
    os.kill(os.getpid(), signal.SIGKILL)


def scribble_then_die(arr: Any, marker: str, log: str) -> float:
    """First attempt: write over the array and crash. The retry must see it unwritten."""
    _log(log)
    seen = float(arr[0])
    arr[:] = -1.0
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return seen


# -- through the public API ------------------------------------------------------------------


def test_64_mib_array_in_and_back(process_pool: parfn.Pool, log: Path) -> None:
    arr = np.random.default_rng(0).random(64 * MiB // 8)
    out = run(process_pool, echo, arr, str(log))
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert np.array_equal(out, arr)
    assert out.flags.writeable and not np.shares_memory(out, arr)
    out[:10] = -1.0  # the caller's own: writing it changes nothing else
    assert arr[0] != -1.0
    again = run(process_pool, echo, arr, str(log))
    assert np.array_equal(again, arr) and not np.shares_memory(again, out)
    del out, again


def test_array_written_by_the_worker_comes_back_as_written(
    process_pool: parfn.Pool, log: Path
) -> None:
    arr = np.arange(4 * MiB // 8, dtype=np.float64)
    out = run(process_pool, touch_then_return, arr, str(log))
    assert out[0] == 1.0 and arr[0] == 0.0
    assert np.array_equal(out[1:], arr[1:])
    half = run(process_pool, first_and_last_half, arr, str(log))
    assert np.array_equal(half, arr[len(arr) // 2 :]) and half.flags.writeable


def test_dict_of_arrays(process_pool: parfn.Pool, log: Path) -> None:
    data = {
        "f64": np.random.default_rng(1).random((512, 1024)),  # 4 MiB
        "i32": np.arange(2 * MiB // 4, dtype=np.int32),
        "fortran": np.asfortranarray(np.random.default_rng(2).random((600, 700))),
        "strided": np.arange(3 * MiB // 8, dtype=np.float64)[::3],  # not contiguous
        "small": np.arange(10),
    }
    out = run(process_pool, double, data, str(log))
    assert out.keys() == data.keys()
    for key, value in data.items():
        assert out[key].dtype == value.dtype, key
        assert np.array_equal(out[key], value * 2), key
        assert out[key].flags.writeable, key
    assert out["fortran"].flags.f_contiguous


def test_big_bytes_and_bytearray(process_pool: parfn.Pool, log: Path) -> None:
    b = os.urandom(3 * MiB)
    ba = bytearray(os.urandom(2 * MiB))
    n, m, back, ba_back = run(process_pool, bytes_info, b, ba, str(log))
    assert (n, m) == (len(b), len(ba))
    assert type(back) is bytes and back == b[::-1]
    assert type(ba_back) is bytearray and ba_back[0] == 7 and ba_back[1:] == ba[1:]
    assert run(process_pool, echo, b, str(log)) == b


def test_small_and_big_items_in_one_map(process_pool: parfn.Pool, log: Path) -> None:
    rng = np.random.default_rng(3)
    items = [rng.random(2 * MiB // 8) if i % 3 == 0 else rng.random(10) for i in range(12)]
    out = process_pool.map(double, items, [str(log)] * len(items))
    assert len(out) == len(items)
    for got, item in zip(out, items):
        assert np.array_equal(got, item * 2)
    assert process_pool.map(echo, [1, "a", None], [str(log)] * 3) == [1, "a", None]


def test_a_map_returning_its_arguments(process_pool: parfn.Pool, log: Path) -> None:
    shared = np.random.default_rng(5).random(MiB // 4)  # 2 MiB, sent once (memo)
    out = process_pool.map(echo, [shared] * 4 + [shared[1:]], [str(log)] * 5, chunksize=2)
    for got in out[:4]:
        assert np.array_equal(got, shared) and got.flags.writeable
    assert np.array_equal(out[4], shared[1:])
    assert not any(np.shares_memory(got, shared) for got in out)


def test_a_retry_sees_the_arguments_unwritten(
    process_pool: parfn.Pool, log: Path, tmp_path: Path
) -> None:
    arr = np.full(2 * MiB // 8, 5.0)
    fn = parfn.parallel(scribble_then_die).options(retries=1)
    assert run(process_pool, fn, arr, str(tmp_path / "marker"), str(log)) == 5.0
    assert arr[0] == 5.0


def test_no_segment_left_after_a_task_raises(process_pool: parfn.Pool, log: Path) -> None:
    with pytest.raises(ValueError, match="bad array of 8388608 bytes"):
        run(process_pool, fail_with, np.zeros(MiB), str(log))


def test_no_segment_left_after_a_timeout(process_pool: parfn.Pool, log: Path) -> None:
    slow = parfn.parallel(sleep_with).options(timeout=0.5)
    with pytest.raises(parfn.TaskTimeout):
        process_pool.spawn(slow, np.zeros(MiB), str(log)).result(timeout=T)


def test_no_segment_left_by_a_worker_killed_holding_its_result(
    process_pool: parfn.Pool, log: Path
) -> None:
    with pytest.raises(parfn.WorkerCrashed, match="SIGKILL"):
        run(process_pool, die_holding_a_result, np.ones(MiB), str(log))
    assert worker_pids(log)


@pytest.mark.parametrize("cancel_pending", [False, True])
def test_no_segment_left_after_shutdown(
    process_pool: parfn.Pool, log: Path, cancel_pending: bool
) -> None:
    arrays = [np.full(MiB // 4, float(i)) for i in range(6)]
    tasks = [process_pool.spawn(double, a, str(log)) for a in arrays]
    process_pool.shutdown(wait=True, cancel_pending=cancel_pending)
    for task, a in zip(tasks, arrays):
        if not cancel_pending:
            assert np.array_equal(task.result(timeout=T), a * 2)
    del tasks
    assert_no_segments(log)


def test_no_segment_left_at_interpreter_exit(tmp_path: Path) -> None:
    """A script that leaves tasks and a segment of its own behind when it exits."""
    script = textwrap.dedent(
        """
        import os, sys
        import numpy as np
        import parfn
        from parfn._wire import shm as _shm
        from parfn._wire.serialize import dumps
        sys.path.insert(0, os.getcwd())
        from tests.test_shared_memory import double

        if __name__ == "__main__":
            pool = parfn.Pool(2)
            tasks = [pool.spawn(double, np.ones(1 << 18), sys.argv[1]) for _ in range(4)]
            kept = dumps(np.ones(1 << 18), shm="many")  # never released by hand
            (name,) = _shm.segment_names(kept)
            assert os.path.exists(os.path.join(_shm.SHM_DIR, name))
            print(os.getpid(), flush=True)
        """
    )
    path = tmp_path / "script.py"
    path.write_text(script)
    log = tmp_path / "pids"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(path), str(log)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=T,
    )
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    assert not segments_of({pid, *worker_pids(log)})


# -- the _shm module on its own -----------------------------------------------------------------


def test_small_data_is_plain_pickle() -> None:
    for obj in [1, "x", [((1, 2), {"k": np.arange(5)})], b"y" * 1000, np.zeros(1000)]:
        for readers in ("one", "many"):
            data = dumps(obj, shm=readers)  # type: ignore[arg-type]
            assert data == pickle.dumps(obj, 5) == dumps(obj)
            assert not _shm.has_segments(data)
            _shm.release(data)  # a no-op


def test_a_message_is_small_and_names_a_segment_per_big_buffer() -> None:
    arr = np.arange(4 * MiB // 8, dtype=np.float64)
    data = dumps({"a": arr, "b": arr[::2].copy(), "n": 3, "small": np.ones(3)}, shm="many")
    try:
        assert len(data) < 1024
        assert _shm.has_segments(data)
        names = _shm.segment_names(data)
        assert len(names) == 2
        for name, size in zip(names, [arr.nbytes, arr.nbytes // 2]):
            assert name.startswith(_shm.segment_prefix(os.getpid()))
            st = os.stat(os.path.join(_shm.SHM_DIR, name))
            assert st.st_mode & 0o777 == 0o600 and st.st_size == size
        out = loads(data)
        assert np.array_equal(out["a"], arr) and np.array_equal(out["b"], arr[::2])
        assert out["n"] == 3 and np.array_equal(out["small"], np.ones(3))
    finally:
        _shm.release(data)
    assert_no_segments()


def test_each_array_is_unmapped_with_itself() -> None:
    data = dumps([np.zeros(MiB), np.ones(MiB)], shm="one")
    names = _shm.segment_names(data)
    first, second = loads(data)
    _shm.release(data)

    def mapped() -> list[bool]:
        with open("/proc/self/maps") as f:
            maps = f.read()
        return [name in maps for name in names]

    assert mapped() == [True, True]
    del first
    gc.collect()
    assert mapped() == [False, True]
    assert second.sum() == MiB


def test_big_bytes_go_with_the_stream_into_the_segment() -> None:
    value = [b"x" * (2 * MiB), bytearray(b"y" * MiB), "z" * MiB]
    data = dumps(value, shm="one")
    try:
        assert len(data) < 1024 and _shm.has_segments(data)
        out = loads(data)
        assert out == value and type(out[1]) is bytearray
    finally:
        _shm.release(data)
    assert_no_segments()


def test_the_mapping_outlives_the_name_and_is_freed_with_the_array() -> None:
    data = dumps(np.arange(MiB, dtype=np.int64), shm="one")
    (name,) = _shm.segment_names(data)
    assert _shm.has_segments(data)
    out = loads(data)
    _shm.release(data)
    _shm.release(data)  # idempotent
    assert not os.path.exists(os.path.join(_shm.SHM_DIR, name))
    out[5] = -5  # still mapped, and writable
    assert out[5] == -5 and out[6] == 6 and int(out.sum()) == MiB * (MiB - 1) // 2 - 10

    def mapped() -> bool:
        with open("/proc/self/maps") as f:
            return name in f.read()

    assert mapped()
    del out
    gc.collect()
    assert not mapped()
    with pytest.raises(SerializationError, match="is gone"):
        loads(data, "the result")


def test_readers_many_each_get_a_private_copy_and_one_shares() -> None:
    arr = np.zeros(MiB // 8)
    many = dumps(arr, shm="many")
    one = dumps(arr, shm="one")
    try:
        a, b = loads(many), loads(many)
        a[0] = 1.0
        assert b[0] == 0.0 and loads(many)[0] == 0.0  # nobody sees another's writes
        c = loads(one)
        c[0] = 2.0  # the file itself: the receiver owns it
        assert loads(one)[0] == 2.0
    finally:
        _shm.release(many)
        _shm.release(one)
    assert_no_segments()


def test_a_buffer_returned_unchanged_borrows_the_argument_segment() -> None:
    arr = np.random.default_rng(4).random(2 * MiB // 8)
    args = dumps(((arr,), {}), shm="many")
    try:
        (loaded,), _ = loads(args)
        result = dumps([loaded, loaded[1000:]], shm="one", inputs=args)
        # Both borrow: the result owns no segment of its own.
        assert _shm.segment_names(result) == _shm.segment_names(args)
        _shm.release(result)  # leaves the arguments' segment to its owner
        assert _shm.segment_names(args)[0] in os.listdir(_shm.SHM_DIR)
        back, tail = loads(result)
        assert np.array_equal(back, arr) and np.array_equal(tail, arr[1000:])
        back[0] = -1.0
        assert loaded[0] == arr[0] and back.flags.writeable

        loaded[-1] = 42.0  # written: it must be copied, not borrowed
        written = dumps(loaded, shm="one", inputs=args)
        try:
            assert len(_shm.segment_names(written)) == 1
            assert _shm.segment_names(written) != _shm.segment_names(args)
            assert loads(written)[-1] == 42.0
        finally:
            _shm.release(written)
        # Without inputs, or from another message's segment, nothing is borrowed.
        own = dumps(tail, shm="one")
        try:
            assert _shm.segment_names(own)[0].startswith(_shm.segment_prefix(os.getpid()))
            assert _shm.segment_names(own) != _shm.segment_names(args)
        finally:
            _shm.release(own)
    finally:
        _shm.release(args)
    assert_no_segments()


def test_by_value_objects_still_go_through_shared_memory() -> None:
    class Local:  # cannot be pickled by reference: cloudpickle, by value
        def __init__(self, arr: Any) -> None:
            self.arr = arr

    data = dumps(Local(np.ones(MiB)), shm="many")
    try:
        assert _shm.has_segments(data) and len(data) < 4096
        assert np.array_equal(loads(data).arr, np.ones(MiB))
    finally:
        _shm.release(data)
    assert_no_segments()


def test_pickling_errors_are_unchanged() -> None:
    bad = {"arr": np.ones(MiB), "lock": __import__("threading").Lock()}
    with pytest.raises(SerializationError, match="the arguments .* cannot be pickled"):
        dumps(bad, "the arguments", shm="many")
    assert_no_segments()


def test_without_dev_shm_everything_goes_in_band(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_shm, "SHM_DIR", "/nonexistent/parfn-test")
    monkeypatch.setattr(_shm, "_available", None)
    arr = np.arange(MiB, dtype=np.float64)
    data = dumps(arr, shm="many")
    assert not _shm.has_segments(data) and len(data) > arr.nbytes
    assert np.array_equal(loads(data), arr)
    _shm.release_leftovers(os.getpid())  # no /dev/shm: nothing to do, no error


def test_a_full_dev_shm_falls_back_to_in_band(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    class Full:
        def __init__(self, st: os.statvfs_result) -> None:
            self.f_frsize = st.f_frsize
            self.f_bavail = 0

    monkeypatch.setattr(os, "statvfs", lambda path: Full(real(path)))
    data = dumps([b"q" * (2 * MiB), np.ones(MiB)], shm="one")
    assert not _shm.has_segments(data)
    out = loads(data)
    assert out[0] == b"q" * (2 * MiB) and np.array_equal(out[1], np.ones(MiB))
    assert_no_segments()


FAKE_PID = 4_199_999  # above Linux's largest pid (2**22): no process has it


def _fake_segment(pid: int, age: float = 0.0) -> str:
    name = f"{_shm.segment_prefix(pid)}{os.urandom(4).hex()}"
    path = os.path.join(_shm.SHM_DIR, name)
    with open(path, "wb") as f:
        f.write(b"leftover")
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return name


def test_release_leftovers_removes_only_that_process_segments() -> None:
    mine = _fake_segment(FAKE_PID)
    other = _fake_segment(FAKE_PID + 1)
    prefix_only = _fake_segment(FAKE_PID * 10 + 1)  # parfn-41999991-...: not FAKE_PID's
    elsewhere = f"parfn-{FAKE_PID}-1-{os.urandom(4).hex()}"  # another pid namespace's
    open(os.path.join(_shm.SHM_DIR, elsewhere), "wb").close()
    try:
        _shm.release_leftovers(FAKE_PID)
        left = os.listdir(_shm.SHM_DIR)
        assert mine not in left
        assert other in left and prefix_only in left and elsewhere in left
        _shm.release_leftovers(FAKE_PID)  # nothing left: no error
    finally:
        for name in (other, prefix_only, elsewhere):
            os.unlink(os.path.join(_shm.SHM_DIR, name))


def test_sweep_stale_removes_old_segments_of_dead_processes_only() -> None:
    old_dead = _fake_segment(FAKE_PID, age=3600)
    new_dead = _fake_segment(FAKE_PID, age=0)
    old_mine = _fake_segment(os.getpid(), age=3600)
    try:
        _shm.sweep_stale(min_age=60)
        left = os.listdir(_shm.SHM_DIR)
        assert old_dead not in left and new_dead in left and old_mine in left
    finally:
        _shm.release_leftovers(FAKE_PID)
        os.unlink(os.path.join(_shm.SHM_DIR, old_mine))
