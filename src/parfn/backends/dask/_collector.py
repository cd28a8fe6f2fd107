"""Gathering: one thread fetches the results of done Dask tasks, in batches.

Dask calls back on its own thread as each future is done; the collector takes
every run done meanwhile, fetches the results of the finished ones in one
``gather`` (so under load one round trip serves many tasks), and hands each
run with its result to the backend.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable

from ..._typing import Any
from ._runs import Run

__all__ = ("Collector",)


class Collector:
    """The ``parfn-dask-collector`` thread: ``outcome(run, data)`` for each done run.

    ``current(runs)``: those of ``runs`` whose outcome is still wanted.
    ``data`` is the run's gathered result, or None if it was not finished
    or the gather failed (``outcome`` then asks its future).
    """

    def __init__(
        self,
        client: Any,
        current: Callable[[list[Run]], list[Run]],
        outcome: Callable[[Run, bytes | None], None],
    ) -> None:
        self._client = client
        self._current = current
        self._outcome = outcome
        self._done: deque[Run] = deque()  # guarded by _cond
        self._cond = threading.Condition()
        self._stopping = False  # guarded by _cond
        self.thread = threading.Thread(target=self._loop, name="parfn-dask-collector", daemon=True)
        self.thread.start()

    def on_done(self, run: Run, future: Any) -> None:
        """The Dask future of ``run`` is done (on Dask's callback thread): pass it on."""
        with self._cond:
            self._done.append(run)
            self._cond.notify()

    def stop(self) -> None:
        """End the thread once it has handed on the runs done so far."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self.thread is not threading.current_thread():
            self.thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._done and not self._stopping:
                    self._cond.wait()
                if not self._done:
                    return
                batch = list(self._done)
                self._done.clear()
            # A call of its own: while this thread waits, its locals must not
            # keep the last runs (their jobs, functions, arguments) alive.
            self._deliver(batch)
            del batch

    def _deliver(self, batch: list[Run]) -> None:
        batch = self._current(batch)
        finished = {run.key: run.future for run in batch if run.future.status == "finished"}
        data: dict[str, Any] = {}
        if finished:
            with contextlib.suppress(Exception):  # then each on its own, below
                data = self._client.gather(finished, errors="skip")
        for run in batch:
            try:
                self._outcome(run, data.get(run.key))
            except Exception:  # a bug: say so, and keep delivering the others
                logging.getLogger("parfn").exception("delivering %r failed", run.job)
