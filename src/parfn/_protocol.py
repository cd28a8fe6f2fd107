"""The small named messages between the parent and a worker process.

Parent -> worker, one frame each (the parent may put several in one write)::

    Define(fn_id, data)        a function, sent to each worker once
    Batch(runs)                run these, in order; one Results frame answers
    Cancel(run_id)             drop that run if it has not started

Worker -> parent::

    Results(done)              the outcomes of one Batch, a Done per Run
    InitFailed(error)          the initializer raised; the worker then exits

A worker exits when its pipe reaches end-of-file. Besides the pipe, each worker
has a *status slot*, three float64 in shared memory, where it writes
``(run id, item index, start time)`` as each item starts: that is how the
parent knows, without a message per item, which item a crashed or timed-out
worker was running, and when that item began.
"""

from __future__ import annotations

import pickle
from typing import Any

from ._serialize import ExceptionEnvelope

__all__ = (
    "SLOT_INDEX",
    "SLOT_JOB",
    "SLOT_START",
    "Batch",
    "Cancel",
    "Define",
    "Done",
    "InitFailed",
    "Results",
    "Run",
    "decode",
    "encode",
)

SLOT_JOB, SLOT_INDEX, SLOT_START = 0, 1, 2
"""Positions in a worker's status slot. Index -1: loading the run's arguments."""


class _Message:
    """Pickled as its class and its fields, in ``__slots__`` order (= ``__init__``'s)."""

    __slots__: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), tuple(getattr(self, name) for name in self.__slots__))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r:.60}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Define(_Message):
    __slots__ = ("fn_id", "data")

    def __init__(self, fn_id: int, data: bytes) -> None:
        self.fn_id = fn_id
        self.data = data


class Run(_Message):
    """Run items ``lo:hi`` of the pickled item list ``data`` with function ``fn_id``.

    ``timed``: write each item's start time to the status slot (a timeout is
    watched). ``retries``: re-run an item that raised, this many more times.
    """

    __slots__ = ("run_id", "fn_id", "data", "lo", "hi", "retries", "timed")

    def __init__(
        self, run_id: int, fn_id: int, data: bytes, lo: int, hi: int, retries: int, timed: bool
    ) -> None:
        self.run_id = run_id
        self.fn_id = fn_id
        self.data = data
        self.lo = lo
        self.hi = hi
        self.retries = retries
        self.timed = timed


class Batch(_Message):
    __slots__ = ("runs",)

    def __init__(self, runs: list[Run]) -> None:
        self.runs = runs


class Cancel(_Message):
    __slots__ = ("run_id",)

    def __init__(self, run_id: int) -> None:
        self.run_id = run_id


class Done(_Message):
    """The outcome of one Run: ``payload`` pickles ``(values, errors)``.

    ``errors`` maps item index to an ExceptionEnvelope. ``payload`` is None
    when the run was cancelled before it started, and empty when its
    arguments could not be loaded (the parent then sends the items one by one).
    """

    __slots__ = ("run_id", "lo", "hi", "payload", "elapsed")

    def __init__(
        self, run_id: int, lo: int, hi: int, payload: bytes | None, elapsed: float
    ) -> None:
        self.run_id = run_id
        self.lo = lo
        self.hi = hi
        self.payload = payload
        self.elapsed = elapsed


class Results(_Message):
    __slots__ = ("done",)

    def __init__(self, done: list[Done]) -> None:
        self.done = done


class InitFailed(_Message):
    __slots__ = ("error",)

    def __init__(self, error: ExceptionEnvelope) -> None:
        self.error = error


def encode(message: _Message) -> bytes:
    """A message as bytes. Messages hold only ints, floats and bytes."""
    return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)


def decode(data: bytes | bytearray | memoryview) -> Any:
    return pickle.loads(data)
