"""What one Dask task carries: a run of a job's items, pickled, and its key.

A Run is items ``lo:hi`` of a Job sent as one task. The function is pickled
once per function (FunctionPickles) and the items once per run (dump_items);
the key starts with the function's name, by which Dask's dashboard groups tasks.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

from ..._typing import Any
from ..._wire.errors import SerializationError
from ..._wire.serialize import describe_item_error, dump_function, dumps
from .._base import Job

__all__ = ("FunctionPickles", "Run", "dump_items", "key_prefix")


class Run:
    """Items ``lo:hi`` of a job as one Dask task; ``tries``: earlier runs of them."""

    __slots__ = ("armed", "fn_data", "future", "hi", "job", "key", "lo", "payload", "tries")

    def __init__(
        self, job: Job, lo: int, hi: int, tries: int, fn_data: bytes, payload: bytes
    ) -> None:
        self.job, self.lo, self.hi, self.tries = job, lo, hi, tries
        self.fn_data, self.payload = fn_data, payload
        self.key = ""
        self.future: Any = None
        self.armed = False  # its deadline is set


class FunctionPickles:
    """Functions pickled once each (by identity, for the last 256).

    The cache holds a weak reference: it must not keep a function (or a bound
    method's object) alive after its tasks are done. What cannot be weakly
    referenced is pickled anew each time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: OrderedDict[int, tuple[Callable[[], Any], bytes]] = OrderedDict()

    def dump(self, fn: Callable[..., Any]) -> bytes:
        """``fn`` pickled; raises SerializationError if it cannot be."""
        key = id(fn)
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and hit[0]() is fn:
                self._data.move_to_end(key)
                return hit[1]
        data = dump_function(fn, main_by_reference=False)
        try:
            ref = weakref.ref(fn)
        except TypeError:
            return data
        with self._lock:
            self._data[key] = (ref, data)
            if len(self._data) > 256:
                self._data.popitem(last=False)
        return data


def dump_items(job: Job, lo: int, hi: int) -> bytes:
    """Items ``lo:hi`` of ``job`` pickled, with its ``star`` and ``kwargs``.

    Raises SerializationError; for one item, naming the argument at fault.
    """
    items = list(job.items[lo:hi])
    try:
        return dumps((job.star, job.kwargs, items), "the arguments")
    except SerializationError as err:
        if hi - lo != 1:
            raise
        args, kwargs = job.call_args(lo)
        raise SerializationError(
            describe_item_error(args, kwargs, err.__cause__ or err)
        ) from err.__cause__


def key_prefix(fn: Callable[..., Any]) -> str:
    """The function's name, for the task's key (Dask's dashboard groups by it)."""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "task"
