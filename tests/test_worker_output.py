"""What workers log and print shows in the parent, as the parent's configuration says.

The first tests run scripts as a user writes them (``python script.py``, the
function defined in the script, logging configured with ``basicConfig``) and
check the exact lines a terminal shows, under each start method and the
default pool. The others use a pool in this process, with a handler that
collects records, or ``contextlib.redirect_stdout`` (what a notebook cell does).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import parfn

from . import _scripts
from . import funcs_observe as fo
from .conftest import FORK_WARNING, START_METHODS, child_env

T = 30  # seconds: every wait in these tests is bounded


def run_script(folder: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python script.py args`` of ``source`` in ``folder``, as a user runs it (must exit 0)."""
    return _scripts.run_script(
        folder,
        source,
        *args,
        name="script.py",
        flags=("-W", "ignore::DeprecationWarning"),
        timeout=120,
    )


# -- what a terminal shows -------------------------------------------------------------------

USER_SCRIPT = """
import logging, sys
import parfn

logging.basicConfig(
    format="%(levelname)s %(name)s %(processName)s: %(message)s",
    level=logging.DEBUG,
    stream=sys.stdout,
)
log = logging.getLogger("app")

@parfn.parallel
def work(x):
    log.debug("debug %d", x)
    log.info("info %d", x)
    print(f"print {x}")
    print(f"to stderr {x}", file=sys.stderr)
    return x * 10

if __name__ == "__main__":
    method = sys.argv[1]
    if method == "default":
        results = work.map(range(3))
    else:
        with parfn.Pool(2, start_method=method):
            results = work.map(range(3))
    print("results", results)
"""


@pytest.mark.parametrize("method", _scripts.SCRIPT_METHODS)
def test_a_script_shows_its_workers_logs_and_prints(tmp_path: Path, method: str) -> None:
    out = run_script(tmp_path, USER_SCRIPT, method)
    lines = out.stdout.splitlines()
    assert lines[-1] == "results [0, 10, 20]"
    worker = "parfn-worker"  # the worker's processName, whatever started it
    for x in range(3):
        mine = [line for line in lines if line.endswith(f" {x}")]
        # The parent's format, once each (no copy from a handler a fork inherited).
        assert len(mine) == 3, lines
        assert mine[0] == f"DEBUG app {worker}: debug {x}", mine
        assert mine[1] == f"INFO app {worker}: info {x}", mine
        assert mine[2] == f"print {x}"
    assert len(lines) == 10, lines
    assert sorted(out.stderr.splitlines()) == [f"to stderr {x}" for x in range(3)]


LATE_LOGGING_SCRIPT = """
import sys
import parfn

@parfn.parallel
def work(x):
    import importlib.util

    assert importlib.util.find_spec("logging")  # looked for, not imported
    import logging  # the worker's first import of it

    logging.getLogger("app").info("info %d", x)
    return x * 10

def note(x):
    print(f"print {x}")
    return x

if __name__ == "__main__":
    method = sys.argv[1]
    pool = parfn.Pool(1, start_method=None if method == "default" else method)
    with pool:
        print("loaded", "logging" in sys.modules)
        pool.apply(note, 1)  # the worker runs a task before any logging
        import logging  # the parent configures logging once the pool runs

        logging.basicConfig(
            format="%(levelname)s %(name)s %(parfn_function)s: %(message)s",
            level=logging.INFO,
            stream=sys.stdout,
        )
        print("results", work.map(range(2)), pool.apply(work, 2))
"""


@pytest.mark.parametrize("method", _scripts.SCRIPT_METHODS)
def test_a_worker_forwards_logging_from_its_first_import(tmp_path: Path, method: str) -> None:
    # Neither process had loaded logging when the worker started: its records
    # still reach the parent's handlers, at the parent's levels, from the first.
    lines = run_script(tmp_path, LATE_LOGGING_SCRIPT, method).stdout.splitlines()
    assert lines[:2] == ["loaded False", "print 1"], lines
    assert lines[2:] == [
        "INFO app work: info 0",
        "INFO app work: info 1",
        "INFO app work: info 2",
        "results [0, 10] 20",
    ], lines


NESTED_POOL_LOGGING_SCRIPT = """
import logging
import sys
import parfn

def leaf(x):
    logging.getLogger("leaf").warning("leaf %d", x)
    return x

def inner(x):
    with parfn.Pool(1, start_method="fork") as pool:  # a pool of the worker's own
        return pool.map(leaf, [x, x + 1])

if __name__ == "__main__":
    logging.basicConfig(format="FWD %(name)s: %(message)s", stream=sys.stdout)
    method = sys.argv[1]
    with parfn.Pool(1, start_method=None if method == "default" else method) as pool:
        print("inner", pool.apply(inner, 10))
"""


@pytest.mark.parametrize("method", _scripts.SCRIPT_METHODS)
def test_a_pool_in_a_task_forwards_its_workers_logs(tmp_path: Path, method: str) -> None:
    lines = run_script(tmp_path, NESTED_POOL_LOGGING_SCRIPT, method).stdout.splitlines()
    assert lines == ["FWD leaf: leaf 10", "FWD leaf: leaf 11", "inner [10, 11]"], lines


CRASH_SCRIPT = """
import ctypes, logging, sys
import parfn

logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")

@parfn.parallel
def risky(x):
    if x == 2:
        print("about to read address 0", file=sys.stderr)
        ctypes.string_at(0)
    return x

if __name__ == "__main__":
    method = sys.argv[1]
    pool = parfn.Pool(2, start_method=None if method == "default" else method)
    with pool:
        results = risky.map(range(4), return_exceptions=True, chunksize=1)
    print(results[:2], results[3:])
    print(results[2])
"""


@pytest.mark.parametrize("method", _scripts.SCRIPT_METHODS)
def test_a_segfault_in_a_script_is_reported(tmp_path: Path, method: str) -> None:
    out = run_script(tmp_path, CRASH_SCRIPT, method)
    lines = out.stdout.splitlines()
    assert lines[0] == "[0, 1] [3]"
    assert re.fullmatch(
        r"the worker process \d+ running risky\(\) on item 2 of its map died: killed by "
        r"SIGSEGV \(a segmentation fault, in native code\)\. The worker was replaced; "
        r"other tasks are unaffected",
        lines[1],
    ), lines
    assert lines[2] == "The worker's last lines on stderr:"
    report = "\n".join(lines[3:])
    assert "  | about to read address 0" in report
    assert "  | Fatal Python error: Segmentation fault" in report
    assert re.search(r'  \|   File ".*", line \d+ in risky\n', report), report
    # The parent's stderr: the worker's line, faulthandler's dump, the pool's event.
    err = out.stderr
    assert "about to read address 0" in err
    assert "Fatal Python error: Segmentation fault" in err
    assert re.search(r"WARNING parfn: worker process \d+ running risky\(\) died: killed", err)


# -- records go to the parent's logger of the same name -------------------------------------------


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@contextlib.contextmanager
def collecting(name: str = "tests.observe", level: int = logging.DEBUG) -> Iterator[Collect]:
    """A handler on logger ``name`` set to ``level``, taken off afterwards."""
    logger = logging.getLogger(name)
    handler = Collect()
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def test_records_reach_the_logger_of_the_same_name(pool: parfn.Pool) -> None:
    with collecting() as got:
        assert pool.map(fo.log_and_return, range(4)) == [0, 1, 2, 3]
        assert sorted(got.messages()) == [f"warning {i}" for i in range(4)]
    assert {r.name for r in got.records} == {"tests.observe"}
    if pool.backend_name == "process":
        assert all(r.parfn_function == "log_and_return" for r in got.records)  # type: ignore[attr-defined]
        assert all(r.parfn_pid == r.process != os.getpid() for r in got.records)  # type: ignore[attr-defined]


def test_the_parent_level_decides_and_the_worker_follows(process_pool: parfn.Pool) -> None:
    with collecting(level=logging.WARNING) as got:
        _, debug, info = process_pool.apply(fo.log_levels, 1)
        assert (debug, info) == (False, False)  # not even made in the worker
        assert got.messages() == ["warning 1"]
        logging.getLogger("tests.observe").setLevel(logging.DEBUG)  # changed while the pool runs
        _, debug, info = process_pool.apply(fo.log_levels, 2)
        assert (debug, info) == (True, True)
        assert got.messages()[1:] == ["debug 2", "info 2", "warning 2"]


def test_a_record_arrives_before_the_result(process_pool: parfn.Pool) -> None:
    with collecting() as got:
        for i in range(20):
            assert process_pool.apply(fo.log_and_return, i) == i
            assert got.messages()[-1] == f"warning {i}"
            assert process_pool.spawn(fo.log_and_return, -i).result(timeout=T) == -i
            assert got.messages()[-1] == f"warning {-i}"
        assert process_pool.map(fo.log_and_return, range(100)) == list(range(100))
        assert sorted(got.messages()[40:]) == sorted(f"warning {i}" for i in range(100))


def test_a_record_logged_before_a_crash_arrives(process_pool: parfn.Pool) -> None:
    with collecting() as got:
        with pytest.raises(parfn.WorkerCrashed) as info:
            process_pool.apply(fo.log_then_exit, 3)
        assert got.messages() == ["last words before exit 3"]
    assert "stderr before exit" in info.value.stderr


def test_an_exception_keeps_its_traceback_text(process_pool: parfn.Pool) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    with collecting():
        logging.getLogger("tests.observe").addHandler(handler)
        try:
            process_pool.apply(fo.log_exception)
        finally:
            logging.getLogger("tests.observe").removeHandler(handler)
    text = stream.getvalue()
    assert text.startswith("ERROR it failed\nTraceback (most recent call last):\n"), text
    assert "1 / 0" in text
    assert text.rstrip().endswith("ZeroDivisionError: division by zero")


def test_extra_attributes_travel_and_unpicklable_ones_as_text(process_pool: parfn.Pool) -> None:
    with collecting() as got:
        pid = process_pool.apply(fo.log_extra)
    (record,) = got.records
    assert record.user_field == 42  # type: ignore[attr-defined]
    assert record.unpicklable.startswith("<function")  # type: ignore[attr-defined]
    assert record.parfn_pid == pid  # type: ignore[attr-defined]


@pytest.mark.parametrize("start_method", START_METHODS)
def test_an_initializers_records_are_forwarded(start_method: str) -> None:
    with collecting("tests.observe.init", logging.INFO) as got:
        with parfn.Pool(
            1, start_method=start_method, initializer=fo.init_logs, initargs=("ready",)
        ) as pool:
            assert pool.apply(fo.identity, 5) == 5
        assert got.messages() == ["ready"]


def test_records_of_nested_calls_are_forwarded(process_pool: parfn.Pool) -> None:
    with collecting("tests.observe") as got:
        assert process_pool.apply(fo.outer_logs, 3) == 3
    assert got.messages() == ["outer 3", "inner 0", "inner 1", "inner 2"]


def test_a_child_forked_by_a_task_leaves_the_pipe_alone(process_pool: parfn.Pool) -> None:
    with collecting() as got:
        assert process_pool.map(fo.fork_and_print, range(4), chunksize=1) == ["forked"] * 4
        assert process_pool.map(fo.identity, range(50)) == list(range(50))
    assert got.messages() == ["from the worker after its fork"] * 4


# -- prints ---------------------------------------------------------------------------------


def test_prints_go_to_the_current_sys_stdout(pool: parfn.Pool) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert pool.map(fo.print_both, range(5)) == list(range(5))
    if pool.backend_name == "dask":  # as docs/guide/logs.md says: the Dask worker's own stdout
        assert (out.getvalue(), err.getvalue()) == ("", "")
        return
    assert sorted(out.getvalue().splitlines()) == [f"out {i}" for i in range(5)]
    assert sorted(err.getvalue().splitlines()) == [f"err {i}" for i in range(5)]


def test_two_workers_never_mix_their_lines(process_pool: parfn.Pool) -> None:
    out = io.StringIO()
    width = 3000
    with contextlib.redirect_stdout(out):
        tasks = [process_pool.spawn(fo.print_lines, tag, 300, width) for tag in "ab"]
        assert [t.result(timeout=T) for t in tasks] == [300, 300]
    lines = out.getvalue().splitlines()
    assert len(lines) == 600
    assert {line for line in lines} == {"a" * width, "b" * width}


def test_a_partial_line_is_ended_with_its_task(process_pool: parfn.Pool) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        process_pool.apply(fo.print_partial, "no newline")
        process_pool.apply(fo.print_partial, "again")
    assert out.getvalue() == "no newline\nagain\n"


def test_a_workers_streams_work_like_files(process_pool: parfn.Pool) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fd_out, fd_err, encoding = process_pool.apply(fo.stream_facts)
    # The descriptors the worker's streams had (for a child process to inherit).
    assert fd_out >= 0 and fd_err >= 0 and encoding == "utf-8"
    assert out.getvalue() == "bytes line\n"


FLOOD_SCRIPT = """
import resource, sys
import parfn
from tests import funcs_observe as fo

import logging
logging.basicConfig(format="%(message)s", stream=sys.stdout)

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

if __name__ == "__main__":
    with parfn.Pool(2, start_method=sys.argv[1]) as pool:
        pool.map(fo.identity, range(10))
        before = peak_mib()
        # 2 x (10,000 records + 20,000 lines of 2 KB): ~80 MB through a slow reader.
        results = [pool.spawn(fo.flood, 10_000, 20_000, 2000) for _ in range(2)]
        total = sum(t.result(timeout=300) for t in results)
        after = peak_mib()
    print("total", total, file=sys.stderr)
    print("grew", after - before, file=sys.stderr)
"""


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("method", ["forkserver", "fork"])
def test_a_flood_is_slowed_to_the_reader_not_buffered(tmp_path: Path, method: str) -> None:
    """The parent writes a flood out as it comes: a slow reader of its stdout slows
    the workers down (the pipes are bounded); nothing is dropped, and the parent's
    memory does not grow with the size of the flood."""
    script = tmp_path / "flood.py"
    script.write_text(FLOOD_SCRIPT)
    records = lines = 0
    with subprocess.Popen(
        [sys.executable, "-W", "ignore::DeprecationWarning", str(script), method],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            for n, line in enumerate(proc.stdout):
                if n % 2000 == 0:
                    time.sleep(0.05)  # a reader slower than the workers write
                if line.startswith(b"record "):
                    records += 1
                elif len(line) > 1000:
                    lines += 1
            err = proc.stderr.read().decode()
        finally:
            proc.kill()
    assert (records, lines) == (20_000, 40_000), err
    assert "total 60000" in err, err
    grew = float(err.split("grew ")[1].split()[0])
    assert grew < 32, f"the parent's peak memory grew by {grew:.0f} MiB"


# -- other backends ---------------------------------------------------------------------------


def test_thread_backend_records_are_the_parents_own() -> None:
    with collecting() as got, parfn.Pool(2, backend="thread") as pool:
        pool.map(fo.log_and_return, range(3))
    assert sorted(got.messages()) == ["warning 0", "warning 1", "warning 2"]
    assert {r.thread for r in got.records} != {threading.get_ident()}


def test_output_of_the_default_pool_in_a_child_python(tmp_path: Path) -> None:
    code = """
        import contextlib, io
        import parfn
        from tests import funcs_observe as fo

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            parfn.parallel(fo.print_both).map(range(3))
        print(sorted(buf.getvalue().splitlines()))
        """
    out = run_script(tmp_path, code)
    assert out.stdout.strip() == "['out 0', 'out 1', 'out 2']"
    assert sorted(out.stderr.splitlines()) == ["err 0", "err 1", "err 2"]


def test_a_dask_task_sends_back_its_threads_records_within_a_bound() -> None:
    """What ``run_remote`` does in a Dask worker: the records of the task's own
    thread, at most ``MAX_COLLECTED``, then one that counts the others."""
    from parfn._wire import logs as capture

    logger = logging.getLogger("tests.observe.collected")
    other = threading.Thread(target=logger.warning, args=("from another thread",))
    with capture.collected(fo.identity) as records:
        for i in range(capture.MAX_COLLECTED + 5):
            logger.warning("record %d", i)
        other.start()
        other.join(T)
    assert len(records) == capture.MAX_COLLECTED + 1
    assert records[0]["msg"] == "record 0" and records[0]["parfn_function"] == "identity"
    assert records[-1]["name"] == "parfn"
    assert records[-1]["msg"].startswith("5 more records of this task were dropped")
    assert all(r["msg"] != "from another thread" for r in records)
