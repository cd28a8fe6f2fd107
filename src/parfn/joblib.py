"""``parfn.joblib``: a joblib backend named ``"parfn"``, for ``Parallel`` and scikit-learn.

>>> import joblib, parfn.joblib
>>> parfn.joblib.register()
>>> with joblib.parallel_config(backend="parfn", n_jobs=2):
...     joblib.Parallel()(joblib.delayed(abs)(-x) for x in range(4))
[0, 1, 2, 3]
>>> parfn.joblib.shutdown()  # the pool kept for later calls (else: at exit)

joblib's batches run as tasks of a parfn process pool (kept between
``Parallel`` calls, as loky's executor is, and shut down at exit):

* the first error is raised and the tasks still running are stopped (their
  workers are ended), not left to run to their end;
* a worker that dies fails its batch with :class:`parfn.WorkerCrashed`; the
  pool replaces it and the next ``Parallel`` call is unaffected;
* inner thread pools (OpenMP, OpenBLAS, MKL, ...) are capped in each worker,
  at ``max(1, cpus // n_jobs)`` or joblib's ``inner_max_num_threads``;
* ``return_as="generator"`` and ``"generator_unordered"``, ``timeout=``, and
  nested ``Parallel`` calls inside a task (which run on threads, then
  sequentially, as with loky) work as with joblib's own backends.

``parallel_config(backend="parfn", start_method="spawn")`` picks the start
method (default: parfn's).

It implements joblib's backend API (``submit`` and
``retrieve_result_callback``, joblib 1.3 and later), and ``apply_async`` for
older joblib. Needs ``pip install 'parfn[joblib]'``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ._typing import Any

try:
    import joblib
    from joblib._parallel_backends import (
        AutoBatchingMixin,
        FallbackToBackend,
        ParallelBackendBase,
        SequentialBackend,
    )
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError("parfn.joblib needs joblib: pip install 'parfn[joblib]'") from exc

from ._pool import Pool
from ._task import Task
from ._wire.threadcaps import default_threads_per_worker
from .backends._base import available_cpus

__all__ = ("ParfnBackend", "register", "shutdown")

NAME = "parfn"


def register() -> None:
    """Register the ``"parfn"`` backend with joblib (calling it again does nothing more).

    Then ``joblib.parallel_config(backend="parfn", n_jobs=...)`` runs
    ``Parallel`` calls, scikit-learn's ``n_jobs`` included, on parfn.
    """
    joblib.register_parallel_backend(NAME, ParfnBackend)


# -- the pools, kept between Parallel calls ---------------------------------------------

_pools_lock = threading.Lock()
_pools: dict[tuple[Any, ...], Pool] = {}


def _pool_for(n_jobs: int, threads: int, start_method: str | None) -> Pool:
    """The pool of ``n_jobs`` workers of ``threads`` inner threads each, started on first use."""
    key = (n_jobs, threads, start_method)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None or pool._closed:
            for old in _pools.values():  # one pool at a time: another size ends the last
                old.shutdown(wait=False)
            _pools.clear()
            pool = _pools[key] = Pool(n_jobs, start_method=start_method, threads_per_worker=threads)
        return pool


def _forget(pool: Pool) -> None:
    with _pools_lock:
        for key in [k for k, p in _pools.items() if p is pool]:
            del _pools[key]


def shutdown() -> None:
    """Shut the kept pool down now (it would be at interpreter exit); the next
    ``Parallel`` call starts a new one."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown(wait=True)


# -- the backend -----------------------------------------------------------------------


class ParfnBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's backend API on a parfn process pool (see the module docstring)."""

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    supports_timeout = True
    supports_return_generator = True
    supports_sharedmem = False
    uses_threads = False

    _pool: Pool | None = None

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if n_jobs < 0:
            return max(available_cpus() + 1 + n_jobs, 1)
        return n_jobs

    def configure(
        self,
        n_jobs: int = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **backend_kwargs: Any,
    ) -> int:
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        own = getattr(self, "backend_kwargs", {})  # (joblib before 1.3 has none)
        start_method = backend_kwargs.get("start_method", own.get("start_method"))
        self._pool = _pool_for(n_jobs, self.inner_threads(n_jobs), start_method)
        return n_jobs

    def inner_threads(self, n_jobs: int) -> int:
        """How many threads each worker's inner thread pools (OpenMP, OpenBLAS,
        MKL, ...) may use: joblib's ``inner_max_num_threads`` if given, else
        the pool's own default, ``max(1, cpus // n_jobs)`` (loky's too). The
        pool's ``threads_per_worker`` applies it, leaving a variable the user
        set as it is."""
        threads = getattr(self, "inner_max_num_threads", None)
        return int(threads) if threads else default_threads_per_worker(n_jobs)

    def submit(
        self, func: Callable[[], Any], callback: Callable[[Any], object] | None = None
    ) -> Task[Any]:
        pool = self._pool
        if pool is None:
            raise RuntimeError("the parfn backend is not configured: use it through Parallel")
        task = pool.spawn(func)
        if callback is not None:
            task.add_done_callback(callback)
        return task

    def apply_async(
        self, func: Callable[[], Any], callback: Callable[[Any], object] | None = None
    ) -> Task[Any]:
        """joblib before 1.3 calls this; the Task's ``get(timeout)`` serves it."""
        return self.submit(func, callback)

    def retrieve_result_callback(self, out: Task[Any]) -> Any:
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Stop every task now, running ones included (their workers are ended).

        joblib calls this when a task raised: the others' results would be
        dropped anyway. With ``ensure_ready``, a new pool takes over.
        """
        pool, self._pool = self._pool, None
        if pool is not None:
            _forget(pool)
            pool.terminate()
        if ensure_ready and self.parallel is not None:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel)

    def terminate(self) -> None:
        """The end of a ``Parallel`` call: the pool is kept for the next one."""
        self._pool = None
        self.reset_batch_stats()
