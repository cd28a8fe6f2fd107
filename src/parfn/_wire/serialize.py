"""Serialization: what travels between the caller and a worker, and how.

* Data (arguments, results): pickle protocol 5, the fast C pickler. When that
  fails (a lambda, a local class) or the bytes name ``__main__`` (which a
  worker may not be able to import), cloudpickle instead, which sends such
  things by value.
* Functions: an importable module-level function travels by reference (the
  worker imports it, and unwraps it if it is a ``Parallel``); lambdas,
  closures and functions of ``__main__`` or a notebook travel by value with
  cloudpickle.
* Big buffers (numpy arrays' data, big bytes): with ``dumps(..., shm=...)``,
  through shared memory rather than the pipe; see ``shm``.
* Exceptions: wrapped in an :class:`ExceptionEnvelope` that carries the
  worker's traceback text and falls back to :class:`RemoteError` when the
  exception itself cannot make the trip.

cloudpickle is imported on first need, to keep ``import parfn`` cheap.
"""

from __future__ import annotations

import importlib
import pickle
import sys
from collections.abc import Callable
from types import MethodType, TracebackType
from typing import Any

from . import shm as _shm
from .errors import RemoteError, RemoteTraceback, SerializationError
from .shm import Readers

__all__ = (
    "ExceptionEnvelope",
    "dump_function",
    "dumps",
    "load_function",
    "loads",
    "wrap_exception",
)

PROTOCOL = 5
_MAIN = b"__main__"


def _cloudpickle() -> Any:
    import cloudpickle

    return cloudpickle


def dumps(
    obj: Any,
    what: str = "the value",
    *,
    shm: Readers | None = None,
    inputs: bytes | None = None,
) -> bytes:
    """Pickle ``obj``; ``what`` names it in the error ("argument 1", "the result").

    ``shm``: let big buffers travel through shared memory (see ``shm``):
    ``"one"`` receiver will load the bytes and own the memory, or ``"many"``
    may load them, each getting private copy-on-write pages. The bytes may
    then name segments, which whoever ends up owning the bytes unlinks with
    ``_shm.release``. ``inputs``: the bytes of the arguments of the run whose
    result this is; its segments may be borrowed. Without ``shm``, and for
    data with no big buffer, the bytes are those of plain ``pickle.dumps``.

    Raises :class:`SerializationError` saying what could not be pickled and why.
    """
    if shm is not None:
        big: list[pickle.PickleBuffer] = []

        def out_of_band(buf: pickle.PickleBuffer) -> bool:
            # False: leave it out of the stream (big, contiguous); True: keep it in.
            view = memoryview(buf)
            if view.nbytes < _shm.THRESHOLD or not view.contiguous:
                return True
            big.append(buf)
            return False

        try:
            data = pickle.dumps(obj, PROTOCOL, buffer_callback=out_of_band)
        except Exception:
            data = None
        if data is not None and not big and len(data) < _shm.THRESHOLD and _MAIN not in data:
            return data  # nothing big: the bytes of plain pickle
        return _dumps_shared(obj, what, shm, inputs, data, big, out_of_band)
    try:
        data = pickle.dumps(obj, PROTOCOL)
    except Exception:
        data = None
    if data is None or _MAIN in data:
        try:
            data = _cloudpickle().dumps(obj, PROTOCOL)
        except Exception as exc:
            raise SerializationError(_cannot_pickle(obj, what, exc)) from exc
    return data


def _dumps_shared(
    obj: Any,
    what: str,
    readers: Readers,
    inputs: bytes | None,
    data: bytes | None,
    big: list[pickle.PickleBuffer],
    out_of_band: Callable[[pickle.PickleBuffer], bool],
) -> bytes:
    """The rest of ``dumps(shm=...)``: by value if need be, then big buffers to shared memory.

    ``data``/``big``: the outcome of the first try, with the C pickler.
    """
    by_value = data is None or _MAIN in data
    if by_value:
        big.clear()
        try:
            data = _cloudpickle().dumps(obj, PROTOCOL, buffer_callback=out_of_band)
        except Exception as exc:
            raise SerializationError(_cannot_pickle(obj, what, exc)) from exc
    assert data is not None
    if not big and len(data) < _shm.THRESHOLD:
        return data
    message = _shm.pack(data, big, readers, inputs) if _shm.available() else None
    if message is not None:
        return message
    # No shared memory here (or no room left in it): all in the stream.
    if by_value:
        return bytes(_cloudpickle().dumps(obj, PROTOCOL))
    return pickle.dumps(obj, PROTOCOL)


def loads(data: bytes | memoryview, what: str = "the value") -> Any:
    """Unpickle ``data``; a failure becomes :class:`SerializationError`.

    Data that names shared-memory segments needs no special case: unpickling
    it maps them (see ``shm``).
    """
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise SerializationError(f"{what} could not be unpickled here: {exc!r}") from exc


def _cannot_pickle(obj: Any, what: str, exc: BaseException) -> str:
    kind = type(obj).__qualname__
    return (
        f"{what} (of type {kind}) cannot be pickled: {exc}. "
        "Pass something picklable instead (plain data, or what it is built from, "
        "and build the object inside the function), or give its class "
        "__getstate__/__reduce__."
    )


def describe_item_error(args: tuple[Any, ...], kwargs: dict[str, Any], exc: BaseException) -> str:
    """Find which argument of one call cannot be pickled, and say so."""
    for i, value in enumerate(args, 1):
        try:
            dumps(value)
        except SerializationError as err:
            return str(err).replace("the value", f"argument {i}", 1)
    for key, value in kwargs.items():
        try:
            dumps(value)
        except SerializationError as err:
            return str(err).replace("the value", f"keyword argument {key!r}", 1)
    return f"the arguments cannot be pickled: {exc}"


# -- functions --------------------------------------------------------------


class _FunctionRef:
    """A module-level function, sent as its import path."""

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str) -> None:
        self.module = module
        self.qualname = qualname


def _importable(fn: Any) -> _FunctionRef | None:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    try:
        found = resolve(module, qualname)
    except Exception:
        return None
    if found is fn or getattr(found, "__wrapped__", None) is fn:
        return _FunctionRef(module, qualname)
    return None


def resolve(module: str, qualname: str) -> Any:
    obj: Any = sys.modules.get(module) or importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def dump_function(fn: Callable[..., Any]) -> bytes:
    """Serialize a function to send to workers: by reference when importable."""
    ref = _importable(fn)
    if ref is not None:
        return pickle.dumps((ref.module, ref.qualname), PROTOCOL)
    if type(fn) is MethodType:
        # A bound method (a classmethod included) of an importable class: by
        # reference too, as pickle sends it, so that the worker runs the
        # class's own code (its tracebacks show the source file and lines).
        try:
            data = pickle.dumps(fn, PROTOCOL)
        except Exception:
            data = _MAIN
        if _MAIN not in data:
            return data
    try:
        return bytes(_cloudpickle().dumps(fn, PROTOCOL))
    except Exception as exc:
        raise SerializationError(_cannot_pickle(fn, "the function", exc)) from exc


def load_function(data: bytes) -> Callable[..., Any]:
    """Inverse of :func:`dump_function`, run in the worker."""
    obj = pickle.loads(data)
    if isinstance(obj, tuple):
        obj = resolve(*obj)
        # A decorated module-level function: run the plain function it wraps.
        # (Duck-typed, so that a worker never imports the decorator module.)
        if getattr(obj, "_parfn_parallel", False):
            obj = obj.__wrapped__
    if not callable(obj):
        raise TypeError(f"{obj!r} is not callable")
    return obj  # type: ignore[no-any-return]


# -- exceptions ---------------------------------------------------------------


def format_user_traceback(exc: BaseException) -> str:
    """The traceback text of ``exc``, without parfn's own frames above the user's."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("parfn."):
        tb = tb.tb_next
    import traceback  # here: only a failing task needs it

    return "".join(traceback.format_exception(type(exc), exc, tb))


def _rebuild(
    data: bytes | None, type_name: str, message: str, tb: str, reason: str
) -> BaseException:
    exc: BaseException
    if data is not None:
        try:
            exc = pickle.loads(data)
        except Exception as err:
            exc = RemoteError(type_name, message, tb, f"it could not be unpickled here: {err!r}")
    else:
        exc = RemoteError(type_name, message, tb, reason)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc


class ExceptionEnvelope:
    """An exception on its way from a worker: itself if it pickles, its text always.

    Unpickling gives back the exception (with the worker's traceback as its
    ``__cause__``), or a :class:`RemoteError` if it cannot be rebuilt.
    """

    __slots__ = ("data", "message", "reason", "tb", "type_name")

    def __init__(self, exc: BaseException) -> None:
        self.type_name = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix(
            "builtins."
        )
        try:
            self.message = str(exc)
        except Exception:
            self.message = "<str() of the exception failed>"
        self.tb = format_user_traceback(exc)
        self.reason = ""
        self.data: bytes | None
        try:
            # Pickle without the traceback chain: the text carries it.
            cause, context, exc.__cause__, exc.__context__ = (
                exc.__cause__,
                exc.__context__,
                None,
                None,
            )
            try:
                self.data = dumps(exc)
            finally:
                exc.__cause__, exc.__context__ = cause, context
        except Exception as err:
            self.data = None
            self.reason = f"it could not be pickled: {err.__cause__ or err!r}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.data, self.type_name, self.message, self.tb, self.reason))

    def unwrap(self) -> BaseException:
        """The exception as the caller will see it (for in-process use)."""
        return _rebuild(self.data, self.type_name, self.message, self.tb, self.reason)


def wrap_exception(exc: BaseException) -> ExceptionEnvelope:
    return ExceptionEnvelope(exc)
