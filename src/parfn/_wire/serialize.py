"""Serialization: what travels between the caller and a worker, and how.

* Data (arguments, results): pickle protocol 5, the fast C pickler. When that
  fails (a lambda, a local class) or the bytes name ``__main__`` (which a
  worker may not be able to import), cloudpickle instead, which sends such
  things by value.
* Functions: an importable module-level function travels by reference (the
  worker imports it, and unwraps it if it is a ``Parallel``). A function that
  has a name in a script's ``__main__`` travels by reference too: the worker
  runs its own ``__main__``'s function of that name, with that module's
  globals (an initializer's globals, ``pickle`` of the script's names), as
  with ``multiprocessing``; see ``_from_main``. Lambdas, closures and the
  functions of a notebook or ``python -c`` travel by value with cloudpickle.
* Big buffers (numpy arrays' data, big bytes): with ``dumps(..., shm=...)``,
  through shared memory rather than the pipe; see ``shm``.
* Exceptions: wrapped in an :class:`ExceptionEnvelope` that carries the
  worker's traceback text and falls back to :class:`RemoteError` when the
  exception itself cannot make the trip.

cloudpickle is imported on first need, to keep ``import parfn`` cheap.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import marshal
import pickle
import sys
import types
import weakref
from collections.abc import Callable, Mapping
from types import MethodType, TracebackType

from .._typing import Any
from . import shm as _shm
from .errors import RemoteError, RemoteTraceback, SerializationError
from .shm import Readers

__all__ = (
    "ExceptionEnvelope",
    "dump_function",
    "dumps",
    "forget_snapshot",
    "load_function",
    "loads",
    "snapshot_script",
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
    main_by_reference: bool = False,
    to_script: bool = False,
    forked_with: int | None = None,
) -> bytes:
    """Pickle ``obj``; ``what`` names it in the error ("argument 1", "the result").

    Objects of the script's ``__main__`` (an instance of a class it defines)
    travel by value, with cloudpickle, as the receiver may lack them; with
    ``main_by_reference``, by reference, as pickle sends them: for a worker's
    results and exceptions, whose receiver, the caller, is the script itself
    (so that ``except MyError`` catches the script's own class).

    ``to_script``: the receiver's ``__main__`` is the script too (a process
    worker's, forked or imported anew): the functions and classes the script
    names travel by name, as ``multiprocessing`` sends them, so that an
    argument of the script's class is an instance of the worker's class,
    with a copy by value for a worker that lacks them (``_from_main``). With
    ``forked_with`` (a snapshot's token: see :func:`snapshot_script`), those
    in the snapshot travel as references into it, which a worker forked after
    it has, with neither a copy nor cloudpickle.

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
        if data is not None and not main_by_reference and _MAIN in data:
            big.clear()
            data = _dumps_main_refs(obj, forked_with, out_of_band) if to_script else None
        if data is not None and not big and len(data) < _shm.THRESHOLD:
            return data  # nothing big: the bytes of plain pickle
        return _dumps_shared(
            obj,
            what,
            shm,
            inputs,
            data,
            big,
            out_of_band,
            main_by_reference,
            to_script,
            forked_with,
        )
    try:
        data = pickle.dumps(obj, PROTOCOL)
    except Exception:
        data = None
    if data is not None and not main_by_reference and _MAIN in data:
        data = _dumps_main_refs(obj, forked_with) if to_script else None
    if data is None:
        try:
            data = _by_value(obj, to_script)
        except Exception as exc:
            raise SerializationError(_cannot_pickle(obj, what, exc)) from exc
    return data


def _by_value(
    obj: Any, to_script: bool, buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None
) -> bytes:
    """``obj`` pickled by cloudpickle: what has no importable name travels by value
    (with ``to_script``, the script's named functions and classes by name, each
    with a copy by value: ``_ScriptPickler``)."""
    pickler = _ScriptPickler if to_script and _script_main() is not None else _pickler_base()
    buf = io.BytesIO()
    pickler(buf, PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return buf.getvalue()


def _dumps_shared(
    obj: Any,
    what: str,
    readers: Readers,
    inputs: bytes | None,
    data: bytes | None,
    big: list[pickle.PickleBuffer],
    out_of_band: Callable[[pickle.PickleBuffer], bool],
    main_by_reference: bool,
    to_script: bool,
    forked_with: int | None,
) -> bytes:
    """The rest of ``dumps(shm=...)``: by value if need be, then big buffers to shared memory.

    ``data``/``big``: the outcome of the first try, with the C pickler (None:
    by value).
    """
    by_value = data is None
    if by_value:
        big.clear()
        try:
            data = _by_value(obj, to_script, out_of_band)
        except Exception as exc:
            raise SerializationError(_cannot_pickle(obj, what, exc)) from exc
    assert data is not None
    if not big and len(data) < _shm.THRESHOLD:
        return data
    message = _shm.pack(data, big, readers, inputs) if _shm.available() else None
    if message is not None:
        return message
    # No shared memory here (or no room left in it): all in the stream.
    return dumps(
        obj, what, main_by_reference=main_by_reference, to_script=to_script, forked_with=forked_with
    )


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


def dump_function(
    fn: Callable[..., Any],
    *,
    main_by_reference: bool = True,
    forked_with: int | None = None,
) -> bytes:
    """Serialize a function to send to workers: by reference when importable.

    ``main_by_reference``: whether functions named in a script's ``__main__``
    travel by reference (process workers, whose ``__main__`` is the script's);
    False sends them by value (a Dask worker's ``__main__`` is not the user's).
    ``forked_with``: the token of the snapshot of the script's functions
    (:func:`snapshot_script`) taken before the workers were forked: those
    functions travel as a reference into it, with no copy by value, and so
    without cloudpickle.
    """
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
        if main_by_reference and _script_main() is not None:
            by_name = _dumps_main_refs(fn, forked_with)
            return by_name if by_name is not None else _dumps_with(_ScriptPickler, fn)
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


# -- functions of a script's __main__ ---------------------------------------------


def _script_main() -> types.ModuleType | None:
    """``__main__`` when it is a script (``python script.py``, ``python -m``), else None.

    A notebook, the REPL and ``python -c`` have no file: a worker cannot have
    their functions, whose definitions may also change from cell to cell.
    """
    main = sys.modules.get("__main__")
    if main is None or not getattr(main, "__file__", None) or hasattr(sys, "ps1"):
        return None
    return main


_snapshots: dict[int, dict[str, tuple[Any, types.CodeType | None]]] = {}
"""The script's functions, with their code, and its classes, by name, per
snapshot token: a process forked after a snapshot was taken has these very
objects."""
_tokens = itertools.count(1)


def snapshot_script() -> int | None:
    """Note the functions and classes a script's ``__main__`` names now (a
    ``Parallel``'s function under its name), as they are: a process forked
    from now on has them.

    Returns the token that :func:`dump_function` takes (None outside a
    script); :func:`forget_snapshot` drops it. A pool takes one before it
    forks the process its workers come from.
    """
    main = _script_main()
    if main is None:
        return None
    found: dict[str, tuple[Any, types.CodeType | None]] = {}
    for name, value in list(vars(main).items()):
        try:
            if isinstance(value, type):
                if value.__module__ == "__main__" and value.__qualname__ == name:
                    found[name] = (value, None)
                continue
            if type(value) is not types.FunctionType and (
                getattr(type(value), "_parfn_parallel", None) is True  # a Parallel
            ):
                value = value.__wrapped__
        except Exception:  # an object whose class answers any attribute, or raises
            continue
        if type(value) is types.FunctionType and value.__qualname__ == name:
            found[name] = (value, value.__code__)
    token = next(_tokens)
    _snapshots[token] = found
    return token


def forget_snapshot(token: int | None) -> None:
    """Drop a snapshot (in this process; the workers keep their copy)."""
    _snapshots.pop(token, None)  # type: ignore[arg-type]


def _dumps_main_refs(
    obj: Any,
    token: int | None,
    buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None,
) -> bytes | None:
    """``obj`` pickled with the C pickler, the script's functions and classes by
    reference (``_MainRefPickler``); None if it has a function of the script
    that is not in snapshot ``token`` (or anything else the C pickler cannot
    pickle): cloudpickle is then needed."""
    main = _script_main()
    if main is None:
        return None
    buf = io.BytesIO()
    known = _snapshots.get(token, {}) if token is not None else {}
    try:
        _MainRefPickler(buf, main, token, known, buffer_callback).dump(obj)
    except Exception:
        return None
    return buf.getvalue()


class _MainRefPickler(pickle.Pickler):
    """The C pickler, for a receiver whose ``__main__`` is the script: the
    functions and classes of snapshot ``token`` travel as references into it,
    the script's other classes by name with a copy by value
    (``_class_from_main``); another function of the script stops it."""

    def __init__(
        self,
        file: Any,
        main: types.ModuleType,
        token: int | None,
        known: Mapping[str, tuple[Any, types.CodeType | None]],
        buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None,
    ) -> None:
        super().__init__(file, PROTOCOL, buffer_callback=buffer_callback)
        self.main = main
        self.token = token
        self.known = known

    def reducer_override(self, obj: Any) -> Any:
        # (Called for functions, classes and other objects, not for ints,
        # floats and strings: a batch of many calls costs little more.)
        if type(obj) is types.FunctionType:
            if obj.__module__ != "__main__":
                return NotImplemented
            known = self.known.get(obj.__qualname__)
            if known is not None and known[0] is obj and known[1] is obj.__code__:
                return (_from_snapshot, (self.token, obj.__qualname__))
            raise _NeedsCloudpickle  # sent by name, with its code and a copy by value
        if isinstance(obj, type) and obj.__module__ == "__main__":
            known = self.known.get(obj.__qualname__)
            if known is not None and known[0] is obj:
                return (_from_snapshot, (self.token, obj.__qualname__))
            if not _named_in_main(obj, self.main):
                raise _NeedsCloudpickle  # a class made in a function: by value
            return (_class_from_main, (obj.__qualname__, *_class_copy(obj)))
        return NotImplemented


class _NeedsCloudpickle(Exception):
    """Stops ``_MainRefPickler``: what it met only cloudpickle can send."""


def _from_snapshot(token: int, name: str) -> Any:
    """In a process forked after snapshot ``token`` was taken: its function or class ``name``."""
    try:
        return _snapshots[token][name][0]
    except KeyError:
        raise LookupError(
            f"the script's {name!r} was sent by name to a process that "
            "was not forked after it was defined"
        ) from None


def _named_in_main(fn: Any, main: types.ModuleType) -> bool:
    """True if ``fn`` is the function ``__main__`` names by its qualified name."""
    qualname = getattr(fn, "__qualname__", "")
    if "<" in qualname:
        return False
    obj: Any = main
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return False
    return obj is fn or getattr(obj, "__wrapped__", None) is fn


def _dumps_with(pickler_type: Any, obj: Any) -> bytes:
    buf = io.BytesIO()
    pickler_type(buf, protocol=PROTOCOL).dump(obj)
    return buf.getvalue()


_MAIN_GLOBALS = "parfn:__main__"
"""The persistent id of a script's ``__main__`` globals, in a function sent by value."""


def _pickler_base() -> Any:
    return _cloudpickle().Pickler


class _LazyPickler:
    """Makes the cloudpickle-based picklers on first use (cloudpickle loads lazily)."""

    def __init__(self, build: Callable[[Any], Any]) -> None:
        self.build = build
        self.made: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.made is None:
            self.made = self.build(_pickler_base())
        return self.made(*args, **kwargs)


def _build_by_value_pickler(base: Any) -> Any:
    class ByValueIntoMain(base):  # type: ignore[misc]
        """cloudpickle, but a ``__main__`` function's globals are the worker's ``__main__``.

        Names the function uses that the worker's ``__main__`` lacks (defined
        after the worker started, or inside the ``__main__`` guard) are added
        to it; names it has keep their value there (``_setstate_into_main``).
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            main = sys.modules["__main__"]
            self._main_globals: dict[str, Any] = {}
            self.globals_ref[id(main.__dict__)] = self._main_globals

        def persistent_id(self, obj: Any) -> str | None:
            return _MAIN_GLOBALS if obj is self._main_globals else None

        def _dynamic_function_reduce(self, func: Any) -> Any:
            reduced = super()._dynamic_function_reduce(func)
            if func.__globals__ is sys.modules["__main__"].__dict__:
                return (*reduced[:5], _setstate_into_main)
            return reduced

    return ByValueIntoMain


def _build_script_pickler(base: Any) -> Any:
    class ScriptPickler(base):  # type: ignore[misc]
        """cloudpickle, with the script's named functions and classes sent by
        reference (``_from_main``, ``_class_from_main``)."""

        def reducer_override(self, obj: Any) -> Any:
            if type(obj) is types.FunctionType and obj.__module__ == "__main__":
                main = sys.modules["__main__"]
                if _named_in_main(obj, main):
                    try:
                        fallback: bytes | str = _dumps_with(_ByValuePickler, obj)
                    except Exception as exc:  # it uses something unpicklable: by name only
                        fallback = _why(exc)
                    code = marshal.dumps(obj.__code__)
                    return (_from_main, (obj.__qualname__, code, fallback))
            elif (
                isinstance(obj, type)
                and obj.__module__ == "__main__"
                and _named_in_main(obj, sys.modules["__main__"])
            ):
                return (_class_from_main, (obj.__qualname__, *_class_copy(obj)))
            return super().reducer_override(obj)

    return ScriptPickler


def _class_copy(cls: type) -> tuple[bytes, bytes | str]:
    """The script's class ``cls`` for a worker: its methods' code, to tell the
    worker's class of that name is the same (``_class_code``), and ``cls`` by
    value (or why it cannot be), for a worker that lacks it.

    Made once, and again only if an attribute of the class or of a base class
    of the script is rebound (a class travels with every call that has an
    instance of it, and this copy takes ~0.2 ms).
    """
    key = tuple(
        (id(c), tuple((name, id(value)) for name, value in list(vars(c).items())))
        for c in cls.__mro__
        if c.__module__ == "__main__"
    )
    known = _class_copies.get(cls)
    if known is not None and known[0] == key:
        return known[1]
    try:
        copy: bytes | str = _dumps_with(_ByValuePickler, cls)
    except Exception as exc:
        copy = _why(exc)
    try:
        code = marshal.dumps(_class_code(cls))
    except Exception:  # (code that marshal cannot take: never the same, then)
        code = b""
    with contextlib.suppress(TypeError):  # (a class that cannot be weakly referenced)
        _class_copies[cls] = (key, (code, copy))
    return code, copy


_class_copies: weakref.WeakKeyDictionary[type, tuple[Any, tuple[bytes, bytes | str]]] = (
    weakref.WeakKeyDictionary()
)


def _class_code(cls: type) -> tuple[tuple[str, types.CodeType], ...]:
    """The code of a class's methods (static and class methods, and
    properties' getters, included), by name: what tells a class redefined
    since from the one a worker has. (Its other attributes are like a
    module's globals: a worker has its own.)"""
    found = []
    for name, value in list(vars(cls).items()):
        try:
            value = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            code = getattr(value, "__code__", None)
        except Exception:
            continue
        if isinstance(code, types.CodeType):
            found.append((name, code))
    return tuple(found)


def _why(exc: BaseException) -> str:
    """Why a copy by value failed, for the error a worker raises if it needs it."""
    return f"{type(exc).__name__}: {exc}"


_ByValuePickler = _LazyPickler(_build_by_value_pickler)
_ScriptPickler = _LazyPickler(_build_script_pickler)


class _IntoMainUnpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        if pid == _MAIN_GLOBALS:
            return _script_globals(sys.modules["__main__"])
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def _script_globals(main: types.ModuleType) -> dict[str, Any]:
    """The globals the script's own functions run with, in this process.

    ``__main__``'s dict, except where spawn and forkserver imported the
    script: ``multiprocessing`` runs it with ``runpy.run_path``, whose
    functions keep the globals of that run, of which ``__main__``'s dict is
    only a copy.
    """
    for value in list(main.__dict__.values()):
        if type(value) is types.FunctionType and value.__module__ == main.__name__:
            return value.__globals__
    return main.__dict__


def _setstate_into_main(fn: Any, state: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """cloudpickle's ``_function_setstate``, but the globals the worker's
    ``__main__`` already has keep their value there."""
    from cloudpickle import cloudpickle as cp

    target = fn.__globals__
    slotstate = dict(state[1])
    slotstate["__globals__"] = {
        k: v for k, v in slotstate["__globals__"].items() if k not in target
    }
    builtins = target.get("__builtins__")
    cp._function_setstate(fn, (state[0], slotstate))
    if builtins is not None:
        target["__builtins__"] = builtins


def _from_main(qualname: str, code: bytes, fallback: bytes | str) -> Any:
    """In a worker: the function ``__main__`` names ``qualname``, if it has the same code.

    The worker's ``__main__`` is the script (a forked copy of the caller's, or
    the script imported anew as ``__mp_main__`` by spawn and forkserver), so the
    function runs with the worker's globals, as with ``multiprocessing``.
    Otherwise (defined after the worker started, inside the ``__main__``
    guard, or changed since) it is loaded by value, with the worker's
    ``__main__`` as its globals, and given that name there if it is free.
    """
    main = sys.modules["__main__"]
    found: Any = main
    try:
        for part in qualname.split("."):
            found = getattr(found, part)
        if getattr(found, "_parfn_parallel", False):
            found = found.__wrapped__
        if type(found) is types.FunctionType and found.__code__ == marshal.loads(code):
            return found
    except Exception:
        pass
    if isinstance(fallback, str):
        raise LookupError(
            f"__main__ has no function {qualname!r} here, and it could not be sent by value "
            f"({fallback}): define it at the top level of the script, outside the "
            "`if __name__ == '__main__':` block"
        )
    fn = _IntoMainUnpickler(io.BytesIO(fallback)).load()
    if "." not in qualname:
        fn.__globals__.setdefault(qualname, fn)
        main.__dict__.setdefault(qualname, fn)
    return fn


_same_code: weakref.WeakKeyDictionary[type, bytes] = weakref.WeakKeyDictionary()
"""In a worker: its classes found to have the code the caller sent (the last such)."""


def _class_from_main(qualname: str, code: bytes, fallback: bytes | str) -> type:
    """In a worker: the class ``__main__`` names ``qualname`` (the script's, as
    ``multiprocessing`` finds it) if its methods have the same code, else the
    copy by value made in the caller (defined after the worker started, inside
    the ``__main__`` guard, or redefined since)."""
    found: Any = sys.modules["__main__"]
    try:
        for part in qualname.split("."):
            found = getattr(found, part)
        if isinstance(found, type):
            if _same_code.get(found) == code:
                return found
            if _class_code(found) == marshal.loads(code):
                _same_code[found] = code
                return found
    except Exception:
        pass
    if isinstance(fallback, str):
        raise LookupError(
            f"__main__ has no class {qualname!r} here, and it could not be sent by value "
            f"({fallback}): define it at the top level of the script, outside the "
            "`if __name__ == '__main__':` block"
        )
    cls: type = _IntoMainUnpickler(io.BytesIO(fallback)).load()
    return cls


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
                self.data = dumps(exc, main_by_reference=True)
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
