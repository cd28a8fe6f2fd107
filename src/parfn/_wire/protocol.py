"""The small named messages between the parent and a worker process.

Parent -> worker, one frame each (the parent may put several in one write)::

    Define(fn_id, data)        a function, sent before the first Batch that uses it
    Batch(runs)                run these, in order; one Results frame answers
    Cancel(run_id)             drop that run if it has not started
    Forget(fn_ids)             drop these functions: no Batch yet to run uses them
    LogLevels(levels, disable) the levels the parent's loggers have set: the
                               worker's loggers take them (sent before a Batch
                               when they changed)

Worker -> parent::

    Results(done)              the outcomes of one Batch, a Done per Run
    InitFailed(error)          the initializer raised; the worker then exits
    Log(record)                a log record, as a dict of its attributes
    Output(stream, text)       text written to sys.stdout (1) or sys.stderr (2)

``Log`` and ``Output`` are written as they happen, on the same pipe as the
results: what a task logged or printed arrives before its result. The parent
re-emits them (``parfn.backends._replay``); the worker's side is
``parfn._wire.capture``.

The parent keeps track of the functions each worker holds, and has it forget
the least recently used ones beyond a bound (``parfn.backends.process._dispatch``): a function
forgotten and used again is sent again.

A worker exits when its pipe reaches end-of-file. Besides the pipe, each worker
has a *status slot*, three float64 in shared memory, where it writes
``(run id, item index, start time)`` as each item starts: that is how the
parent knows, without a message per item, which item a crashed or timed-out
worker was running, and when that item began.
"""

from __future__ import annotations

import pickle

from .._typing import Any, NamedTuple
from .serialize import ExceptionEnvelope

__all__ = (
    "ANY_ITEM",
    "SLOT_INDEX",
    "SLOT_JOB",
    "SLOT_START",
    "Batch",
    "Cancel",
    "Define",
    "Done",
    "Forget",
    "InitFailed",
    "Log",
    "LogLevels",
    "Message",
    "Output",
    "Results",
    "Run",
    "decode",
    "encode",
)

SLOT_JOB, SLOT_INDEX, SLOT_START = 0, 1, 2
"""Positions in a worker's status slot. Index -1: loading the run's arguments."""
ANY_ITEM = -2
"""Status index of a run whose items run in one C-level loop: the item is unknown."""


class Define(NamedTuple):
    fn_id: int
    data: bytes


class Run(NamedTuple):
    """Run items ``lo:hi`` of the pickled item list ``data`` with function ``fn_id``.

    ``timed``: write each item's start time to the status slot (a timeout is
    watched). ``retries``: re-run an item that raised, this many more times.
    """

    run_id: int
    fn_id: int
    data: bytes
    lo: int
    hi: int
    retries: int
    timed: bool


class Batch(NamedTuple):
    runs: list[Run]


class Cancel(NamedTuple):
    run_id: int


class Forget(NamedTuple):
    fn_ids: list[int]


class Done(NamedTuple):
    """The outcome of one Run: ``payload`` pickles ``(values, errors)``.

    ``errors`` maps item index to an ExceptionEnvelope. ``payload`` is None
    when the run was cancelled before it started, and empty when its
    arguments could not be loaded (the parent then sends the items one by one).
    A short run of plain scalars that raised nothing sends its ``values``
    list itself, inline. ``retried``: how many times items were run again
    because they raised (for ``pool.stats()``).
    """

    run_id: int
    lo: int
    hi: int
    payload: bytes | list[Any] | None
    elapsed: float
    retried: int = 0


class Results(NamedTuple):
    done: list[Done]


class InitFailed(NamedTuple):
    error: ExceptionEnvelope


class Log(NamedTuple):
    """A record logged in the worker: its attributes, made picklable (the
    message formatted, a traceback as text), plus ``parfn_pid`` and
    ``parfn_function``."""

    record: dict[str, Any]


class Output(NamedTuple):
    """Text the worker wrote to ``sys.stdout`` (``stream`` 1) or ``sys.stderr`` (2).

    Complete lines, except when the worker flushed a partial one: the parent
    writes out whole lines only.
    """

    stream: int
    text: str


class LogLevels(NamedTuple):
    """The levels set on the parent's loggers (``""``: the root) and its
    ``logging.disable`` level: the worker's loggers create the records the
    parent may handle, and no others."""

    levels: dict[str, int]
    disable: int


Message = Define | Batch | Cancel | Forget | Results | InitFailed | Log | Output | LogLevels

# On the wire a message is a plain tuple ``(kind, *fields)``, its nested
# messages plain tuples too: pickling named classes costs a Python call each.
_KINDS: dict[type, int] = {
    Define: 0,
    Batch: 1,
    Cancel: 2,
    Results: 3,
    InitFailed: 4,
    Forget: 5,
    Log: 6,
    Output: 7,
    LogLevels: 8,
}


def encode(message: Message) -> bytes:
    """A message as bytes."""
    kind = _KINDS[type(message)]
    if kind == 1 or kind == 3:  # a list of Runs or of Dones: send their fields
        return pickle.dumps((kind, [tuple(m) for m in message[0]]), PROTOCOL)  # type: ignore[union-attr, arg-type]
    return pickle.dumps((kind, *message), PROTOCOL)


def decode(data: bytes | bytearray | memoryview) -> Message:
    kind, *fields = pickle.loads(data)
    if kind == 1:
        return Batch([Run._make(r) for r in fields[0]])
    if kind == 3:
        return Results([Done._make(d) for d in fields[0]])
    return _CLASSES[kind]._make(fields)  # type: ignore[no-any-return]


_CLASSES: list[Any] = [Define, Batch, Cancel, Results, InitFailed, Forget, Log, Output, LogLevels]
PROTOCOL = pickle.HIGHEST_PROTOCOL
