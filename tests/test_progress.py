"""The progress display: the built-in bar, tqdm, and caller-supplied tqdm-like objects."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest

from parfn._progress import TextBar, open_progress


class FakeStream(io.StringIO):
    """A text stream that says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_bar(
    total: int | None, tty: bool, desc: str = "square"
) -> tuple[TextBar, FakeStream, FakeClock]:
    stream, clock = FakeStream(tty), FakeClock()
    return TextBar(total, desc, stream=stream, clock=clock, interval=0.2), stream, clock


# -- the built-in bar on a terminal ---------------------------------------------------------


def test_terminal_redraws_are_throttled_by_the_clock() -> None:
    bar, stream, clock = make_bar(1000, tty=True)
    assert stream.getvalue().count("\r") == 1  # the empty bar is drawn at open
    for i in range(100):  # 100 updates within 0.198 s: no redraw is due
        clock.now = i * 0.002
        bar.update(1)
    assert stream.getvalue().count("\r") == 1
    clock.now = 0.2
    bar.update(1)
    assert stream.getvalue().count("\r") == 2
    bar.update(5)  # same instant: throttled again
    assert stream.getvalue().count("\r") == 2
    clock.now = 0.45
    bar.update(1)
    assert stream.getvalue().count("\r") == 3
    assert "\n" not in stream.getvalue()
    assert bar.count == 107


def test_terminal_line_shows_desc_count_percent_bar_rate_and_eta() -> None:
    bar, _, _ = make_bar(100, tty=True)
    bar.update(50)
    assert bar.line(2.0) == "square:  50%|" + "#" * 15 + " " * 15 + "| 50/100 [00:02<00:02, 25.0/s]"


def test_terminal_close_draws_final_state_and_ends_the_line() -> None:
    bar, stream, clock = make_bar(10, tty=True)
    bar.update(4)
    clock.now = 0.05
    bar.update(6)  # throttled: not drawn yet
    clock.now = 0.1
    bar.close()
    out = stream.getvalue()
    assert out.endswith("\n")
    last = out.rstrip("\n").rsplit("\r", 1)[-1]
    assert "100%" in last
    assert "10/10" in last
    bar.close()  # a second close writes nothing
    bar.update(1)  # nor does an update after close
    assert stream.getvalue() == out


def test_terminal_line_fits_the_width_and_pads_over_a_longer_previous_line() -> None:
    bar, stream, clock = make_bar(10, tty=True, desc="x" * 200)
    clock.now = 0.5
    bar.update(1)
    for segment in stream.getvalue().split("\r")[1:]:
        assert len(segment) <= 79

    short, stream, clock = make_bar(None, tty=True)
    clock.now = 0.25
    short.update(10_000)  # 40000/s: a longer rate text
    clock.now = 1000.0
    short.update(1)  # rate ~10/s: a shorter line, padded to cover the old one
    first, second = stream.getvalue().split("\r")[2:]
    assert first == "square: 10000 [00:00, 40000/s]"
    assert len(second) == len(first)
    assert second.rstrip().startswith("square: 10001 [16:40, 10.0/s]")


def test_terminal_unknown_total_shows_count_and_rate_without_percent() -> None:
    bar, stream, clock = make_bar(None, tty=True, desc="gen")
    bar.update(7)
    clock.now = 1.0
    bar.close()
    last = stream.getvalue().rstrip("\n").rsplit("\r", 1)[-1]
    assert last.rstrip() == "gen: 7 [00:01, 7.00/s]"


def test_rate_and_time_formats() -> None:
    bar, _, _ = make_bar(10, tty=True)
    assert "?/s" in bar.line(0.0) and "<?" in bar.line(0.0)  # no time has passed yet
    bar.update(1)
    assert "[00:04<00:36, 4.0 s/item]" in bar.line(4.0)
    assert "[1:00:00<9:00:00" in bar.line(3600.0)


# -- the built-in bar when stderr is not a terminal -----------------------------------------


def test_non_terminal_writes_one_summary_line_at_close_only() -> None:
    bar, stream, clock = make_bar(1000, tty=False)
    for i in range(1000):
        clock.now = i * 0.0012
        bar.update(1)
    assert stream.getvalue() == ""
    clock.now = 1.2
    bar.close()
    assert stream.getvalue() == "square: 1000/1000 done in 1.2 s (833/s)\n"
    bar.close()
    assert stream.getvalue().count("\n") == 1


def test_non_terminal_summary_says_when_the_map_stopped_early() -> None:
    bar, stream, clock = make_bar(1000, tty=False)
    bar.update(400)
    clock.now = 0.5
    bar.close()
    assert stream.getvalue() == "square: 400/1000 stopped after 0.5 s (800/s)\n"


def test_non_terminal_summary_with_unknown_total_empty_desc_and_long_run() -> None:
    bar, stream, clock = make_bar(None, tty=False, desc="")
    bar.update(7)
    clock.now = 125.0
    bar.close()
    assert stream.getvalue() == "7 done in 02:05 (17.9 s/item)\n"


def test_zero_total_does_not_divide_by_zero() -> None:
    for tty in (True, False):
        bar, stream, _ = make_bar(0, tty=tty)
        bar.close()
        assert "0/0" in stream.getvalue()


def test_a_broken_stream_never_fails_the_map() -> None:
    class Broken(FakeStream):
        def write(self, s: str) -> int:
            raise OSError("stderr is gone")

    clock = FakeClock()
    bar = TextBar(5, "x", stream=Broken(tty=True), clock=clock)
    clock.now = 1.0
    bar.update(5)
    bar.close()
    quiet = TextBar(5, "x", stream=None, clock=clock)
    quiet.update(5)
    quiet.close()
    assert (bar.count, quiet.count) == (5, 5)


# -- open_progress ---------------------------------------------------------------------------


@pytest.mark.parametrize("off", [False, None])
def test_off_gives_no_display(off: object) -> None:
    assert open_progress(off, 10, "square") is None


def test_true_without_tqdm_gives_the_built_in_bar_on_stderr_at_open_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm...` fail
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    stream = FakeStream(tty=False)
    monkeypatch.setattr(sys, "stderr", stream)
    bar = open_progress(True, 3, "square")
    assert isinstance(bar, TextBar)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert stream.getvalue().startswith("square: 3/3 done in ")


class Recorder:
    """A tqdm-like object supplied by the caller."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.updates: list[int] = []
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.updates.append(n)

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("own_total", "given_total", "expected_total"),
    [(None, 10, 10), (5, 10, 5), (None, None, None)],
)
def test_a_caller_object_gets_updates_and_a_missing_total_but_is_not_closed(
    own_total: int | None, given_total: int | None, expected_total: int | None
) -> None:
    target = Recorder(own_total)
    bar = open_progress(target, given_total, "square")
    assert bar is not None
    bar.update(1)
    bar.update(3)
    bar.close()
    assert target.updates == [1, 3]
    assert target.total == expected_total
    assert not target.closed


def test_a_caller_object_with_only_update_is_accepted() -> None:
    class UpdateOnly:
        def __init__(self) -> None:
            self.n = 0

        def update(self, n: int = 1) -> None:
            self.n += n

    target = UpdateOnly()
    bar = open_progress(target, 4, "square")
    assert bar is not None
    bar.update(4)
    bar.close()
    assert target.n == 4
    assert not hasattr(target, "total")


@pytest.mark.parametrize("bad", ["yes", 1, 0, 2.5, object(), Recorder])
def test_other_values_raise_type_error_naming_what_is_allowed(bad: object) -> None:
    with pytest.raises(TypeError, match="True, False or a tqdm-like object"):
        open_progress(bad, 10, "square")


def test_importing_the_module_does_not_import_tqdm() -> None:
    code = "import sys, parfn._progress; sys.exit('tqdm' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], timeout=30, check=False)
    assert done.returncode == 0


# -- with tqdm installed ---------------------------------------------------------------------


def test_true_with_tqdm_gives_a_tqdm_bar_on_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    tqdm: Any = pytest.importorskip("tqdm")
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = open_progress(True, 10, "square")
    assert isinstance(bar, tqdm.tqdm)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert "square" in stream.getvalue()
    assert "10/10" in stream.getvalue()


def test_a_caller_tqdm_bar_is_updated_and_left_open() -> None:
    tqdm: Any = pytest.importorskip("tqdm")
    stream = io.StringIO()
    target = tqdm.tqdm(file=stream, desc="mine")
    try:
        bar = open_progress(target, 10, "square")
        assert bar is not None
        bar.update(4)
        bar.update(6)
        bar.close()
        assert (target.n, target.total) == (10, 10)
        assert not target.disable  # tqdm sets disable when it is closed
    finally:
        target.close()
