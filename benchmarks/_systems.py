"""One small adapter per measured system, all with 2 workers and each library's idiomatic calls.

Every adapter offers the same operations (``apply``, ``spawn``/``gather``, ``map``,
``imap``, ``close``) and the source of a cold-start script. An operation a library
has no API for raises :class:`NotApplicable`, which the report shows as ``n/a``.
parfn is driven through its public API only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from typing import Any

WORKERS = 2


class NotApplicable(Exception):
    """The system has no API for this operation."""


class System:
    """The interface of an adapter. Subclasses set the class attributes and override."""

    name: str = ""
    label: str = ""
    probe: str = ""
    """Python source that fails unless the system is usable (the availability check)."""
    dist: str = ""
    """The distribution whose version the report shows ("" for the standard library)."""
    cold_code: str = ""
    """A script for ``python -c``: import, one result, shut down."""
    lacks: frozenset[str] = frozenset()
    """Workloads the library has no API for (reported as n/a without running)."""

    def start(self) -> None:
        """Create the pool (workers may start lazily; the driver warms them up)."""
        raise NotImplementedError

    def apply(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """Run ``fn(arg)`` in a worker and wait for the result."""
        raise NotApplicable

    def spawn(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """Submit ``fn(arg)`` and return a handle at once."""
        raise NotApplicable

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        """The results of handles returned by :meth:`spawn`, in order."""
        return [h.result() for h in handles]

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        """``[fn(x) for x in items]`` in parallel; ``chunksize=None`` is the library default."""
        raise NotApplicable

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """The library's lazy ordered map (or its closest call) over ``items``."""
        raise NotApplicable

    def close(self) -> None:
        """Shut the pool down and wait for its workers."""
        raise NotImplementedError


class Parfn(System):
    name, label, dist = "parfn", "parfn", "parfn"
    probe = "import parfn; parfn.Pool"
    cold_code = "import parfn\nwith parfn.Pool(2) as pool:\n    assert pool.apply(abs, -1) == 1\n"

    def start(self) -> None:
        import parfn

        self.pool = parfn.Pool(WORKERS)

    def apply(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.pool.apply(fn, arg)

    def spawn(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.pool.spawn(fn, arg)

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        return list(self.pool.map(fn, items, chunksize=chunksize))

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return iter(self.pool.imap(fn, items))

    def close(self) -> None:
        self.pool.shutdown()


class MpPool(System):
    name, label, dist = "mp", "mp.Pool", ""
    probe = "import multiprocessing.pool"
    cold_code = (
        "import multiprocessing\n"
        "with multiprocessing.Pool(2) as pool:\n"
        "    assert pool.apply(abs, (-1,)) == 1\n"
    )

    def start(self) -> None:
        import multiprocessing

        self.pool = multiprocessing.Pool(WORKERS)

    def apply(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.pool.apply(fn, (arg,))

    def spawn(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.pool.apply_async(fn, (arg,))

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        return [h.get() for h in handles]

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        return self.pool.map(fn, items, chunksize=chunksize)

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return self.pool.imap(fn, items)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class _FutureExecutor(System):
    """Shared by the ``concurrent.futures.Executor`` lookalikes."""

    def start(self) -> None:
        self.ex: Any = self._make()

    def _make(self) -> Any:
        raise NotImplementedError

    def apply(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.ex.submit(fn, arg).result()

    def spawn(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.ex.submit(fn, arg)

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        if chunksize is None:
            return list(self.ex.map(fn, items))
        return list(self.ex.map(fn, items, chunksize=chunksize))

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        # Executor.map is the only lazy-looking call: it submits every item first.
        return iter(self.ex.map(fn, items))

    def close(self) -> None:
        self.ex.shutdown(wait=True)


class CfExecutor(_FutureExecutor):
    name, label, dist = "cf", "ProcessPoolExecutor", ""
    probe = "import concurrent.futures.process"
    cold_code = (
        "from concurrent.futures import ProcessPoolExecutor\n"
        "with ProcessPoolExecutor(2) as ex:\n"
        "    assert ex.submit(abs, -1).result() == 1\n"
    )

    def _make(self) -> Any:
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=WORKERS)


class ParfnExecutor(_FutureExecutor):
    """parfn's drop-in ``ProcessPoolExecutor`` (its workers start on demand)."""

    name, label, dist = "parfn-cf", "parfn.ProcessPoolExecutor", "parfn"
    probe = "import parfn; parfn.ProcessPoolExecutor"
    cold_code = (
        "from parfn import ProcessPoolExecutor\n"
        "with ProcessPoolExecutor(2) as ex:\n"
        "    assert ex.submit(abs, -1).result() == 1\n"
    )

    def _make(self) -> Any:
        from parfn import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=WORKERS)


class Loky(_FutureExecutor):
    name, label, dist = "loky", "loky", "loky"
    probe = "import loky"
    cold_code = (
        "import loky\n"
        "ex = loky.get_reusable_executor(max_workers=2)\n"
        "assert ex.submit(abs, -1).result() == 1\n"
        "ex.shutdown(wait=True)\n"
    )

    def _make(self) -> Any:
        import loky

        return loky.get_reusable_executor(max_workers=WORKERS)


class Joblib(System):
    name, label, dist = "joblib", "joblib", "joblib"
    lacks = frozenset({"spawn"})  # no call that submits one task and returns a handle
    probe = "import joblib"
    cold_code = (
        "from joblib import Parallel, delayed\n"
        "assert Parallel(n_jobs=2)([delayed(abs)(-1)]) == [1]\n"
    )
    backend: str | None = None
    """joblib's backend (None: its default, loky)."""

    def start(self) -> None:
        import joblib

        self.joblib = joblib
        # A managed Parallel keeps its workers between calls: joblib's way to call repeatedly.
        self.par: Any = joblib.Parallel(n_jobs=WORKERS, backend=self.backend)
        self.par.__enter__()

    def apply(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.par([self.joblib.delayed(fn)(arg)])[0]

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        batch: Any = "auto" if chunksize is None else chunksize
        d = self.joblib.delayed(fn)
        par = self.joblib.Parallel(n_jobs=WORKERS, batch_size=batch, backend=self.backend)
        return list(par(d(x) for x in items))

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        d = self.joblib.delayed(fn)
        par = self.joblib.Parallel(n_jobs=WORKERS, return_as="generator", backend=self.backend)
        return iter(par(d(x) for x in items))

    def close(self) -> None:
        self.par.__exit__(None, None, None)
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)


class JoblibParfn(Joblib):
    """The same ``Parallel`` calls as ``joblib``, on parfn's joblib backend."""

    name, label, dist = "joblib-parfn", "joblib on parfn", "joblib"
    probe = "import joblib, parfn.joblib"
    cold_code = (
        "import parfn.joblib\n"
        "from joblib import Parallel, delayed\n"
        "parfn.joblib.register()\n"
        "assert Parallel(n_jobs=2, backend='parfn')([delayed(abs)(-1)]) == [1]\n"
    )
    backend = "parfn"

    def start(self) -> None:
        import parfn.joblib

        parfn.joblib.register()
        super().start()

    def close(self) -> None:
        import parfn.joblib

        self.par.__exit__(None, None, None)
        parfn.joblib.shutdown()


class Pebble(System):
    name, label, dist = "pebble", "Pebble", "pebble"
    probe = "import pebble"
    cold_code = (
        "from pebble import ProcessPool\n"
        "with ProcessPool(max_workers=2) as pool:\n"
        "    assert pool.submit(abs, None, -1).result() == 1\n"
    )

    def start(self) -> None:
        from pebble import ProcessPool

        self.pool: Any = ProcessPool(max_workers=WORKERS)

    def apply(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.pool.submit(fn, None, arg).result()

    def spawn(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.pool.submit(fn, None, arg)

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        return list(self.pool.map(fn, items, chunksize=chunksize or 1).result())

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return iter(self.pool.map(fn, items).result())

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class Mpire(System):
    name, label, dist = "mpire", "mpire", "mpire"
    probe = "import mpire"
    cold_code = (
        "from mpire import WorkerPool\n"
        "with WorkerPool(n_jobs=2) as pool:\n"
        "    assert pool.apply(abs, args=(-1,)) == 1\n"
    )

    def start(self) -> None:
        from mpire import WorkerPool

        # keep_alive: reuse the workers across calls, as every other system here does.
        self.pool: Any = WorkerPool(n_jobs=WORKERS, keep_alive=True)

    def apply(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.pool.apply(fn, args=(arg,))

    def spawn(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.pool.apply_async(fn, args=(arg,))

    def gather(self, handles: Sequence[Any]) -> list[Any]:
        return [h.get() for h in handles]

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        if items and isinstance(items[0], tuple):  # mpire would pass a tuple's items as arguments
            items = [(item,) for item in items]
        return list(self.pool.map(fn, items, chunk_size=chunksize))

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return iter(self.pool.imap(fn, items))

    def close(self) -> None:
        self.pool.stop_and_join()


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (Parfn, MpPool, CfExecutor, ParfnExecutor, Loky, Joblib, JoblibParfn, Pebble, Mpire)
}
"""Every system, by its ``--systems`` name, in report order."""


def make(name: str) -> System:
    """A fresh adapter for the system named ``name``."""
    return SYSTEMS[name]()


def version(name: str) -> str:
    """The installed version of a system's distribution ("" if unknown or stdlib)."""
    dist = SYSTEMS[name].dist
    if not dist:
        return ""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""
