"""The client and cluster parfn holds: connecting to Dask, and letting go.

A pool starts a LocalCluster of its own, connects a Client to an
``address``, or borrows the user's ``client``. What parfn starts it closes at
the end; a user's client it leaves as it found it. ``distributed`` is imported
here, on first use, and its absence names the extra to install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Callable

from ..._typing import Any
from ..._wire.serialize import dumps
from .._base import available_cpus
from ._remote import initializer_plugin

__all__ = ("Connection", "Markers", "check_options", "import_distributed", "local_cluster")

_INSTALL = "the dask backend needs the 'distributed' package: pip install 'parfn[dask]'"


def import_distributed() -> Any:
    try:
        import distributed  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    return distributed


def local_cluster(n_workers: int) -> Any:
    """A LocalCluster of ``n_workers`` one-thread worker processes, on loopback,
    with no dashboard: the scheduler's small HTTP server (health, metrics)
    listens on a free port, not on 8787 where another may be. (The tests and
    the Dask benchmark start theirs here too.)"""
    distributed = import_distributed()
    return distributed.LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )


def check_options(
    workers: int | None,
    address: str | None,
    client: Any,
    initializer: Callable[..., object] | None,
    start_method: str | None,
    max_tasks_per_worker: int | None,
) -> None:
    """Refuse options that do not fit Dask, or that contradict each other."""
    if start_method is not None:
        raise ValueError(
            "start_method is not an option of the dask backend: Dask starts its own "
            "worker processes (see the distributed.worker.multiprocessing-method setting)"
        )
    if max_tasks_per_worker is not None:
        raise ValueError(
            "max_tasks_per_worker is not supported by the dask backend: Dask has no "
            "per-task limit on a worker's life (see `dask worker --lifetime`)"
        )
    if address is not None and client is not None:
        raise ValueError("give the dask backend an address= or a client=, not both")
    if workers is not None and (address is not None or client is not None):
        raise ValueError(
            "workers= sets the size of the LocalCluster that parfn starts; a cluster "
            "given by address= or client= has the workers it has"
        )
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ValueError(f"workers must be an int >= 1 or None, not {workers!r}")
    if initializer is not None and not callable(initializer):
        raise TypeError(f"initializer must be callable, not {initializer!r}")


class Markers:
    """A directory of marker files, one for each task a worker has begun.

    A task's file holds what it is doing, "load" (its arguments) or "run";
    it is removed when the task ends, so after a worker dies the files say
    which of the tasks it held had begun (see ``_remote.run_remote``).
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="parfn-dask-")
        # removed at shutdown; also at exit, should the pool never be shut down
        weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)

    def path(self, key: str) -> str:
        return os.path.join(self.dir, key)

    def phase(self, key: str) -> str:
        """What task ``key`` was doing: "queued" (not begun), "load" or "run"."""
        try:
            with open(self.path(key), "rb") as f:
                return f.read().decode().strip() or "load"
        except OSError:
            return "queued"

    def remove(self, key: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path(key))

    def remove_all(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Connection:
    """A pool's client, the cluster parfn started (if any), and what it set up there.

    ``on_started(event)`` is subscribed to ``topic``, the events by which
    workers say that a timed item started. ``limit``: the most tasks to have
    in flight in Dask (None: no limit); ``markers``: set on a cluster parfn
    started. ``token`` is in every key, topic and plugin name of this pool.
    """

    def __init__(
        self,
        workers: int | None,
        *,
        address: str | None,
        client: Any,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        on_started: Callable[[tuple[float, Any]], None],
    ) -> None:
        distributed = import_distributed()
        self.token = uuid.uuid4().hex
        self.topic = f"parfn-started-{self.token}"
        self.plugin_name: str | None = None
        self.subscribed = False
        self.cluster: Any = None  # the LocalCluster parfn started, if any
        self.markers: Markers | None = None  # its "task begun" files
        self.limit: int | None = None
        self.owns_client = client is None
        self.killed_worker: type[BaseException] = distributed.KilledWorker

        if client is not None:
            if not isinstance(client, distributed.Client):
                raise TypeError(f"client must be a distributed.Client, not {client!r}")
            if client.asynchronous:
                raise ValueError("the dask backend needs a synchronous distributed.Client")
            self.client: Any = client
        elif address is not None:
            self.client = distributed.Client(address, set_as_default=False)
        else:
            import dask

            # parfn counts crash retries itself, so the scheduler must not
            # silently re-run a task whose worker died. Dask then fails every
            # task the dying worker held, run or queued: a marker file tells
            # parfn which had started. At most two tasks per worker thread
            # are sent ahead; the rest wait here, where they can be cancelled.
            n = workers or available_cpus()
            self.limit = 2 * n
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                self.cluster = local_cluster(n)
            try:
                self.client = distributed.Client(self.cluster, set_as_default=False)
            except BaseException:
                self.cluster.close()
                raise
        try:
            if self.cluster is not None:
                self.markers = Markers()
            if initializer is not None:
                plugin = initializer_plugin(
                    dumps((initializer, tuple(initargs)), "the initializer")
                )
                name = f"parfn-initializer-{self.token}"
                # register_plugin is distributed >= 2023.9's name for it
                register = getattr(self.client, "register_plugin", None)
                if register is None:
                    register = self.client.register_worker_plugin
                register(plugin, name=name)
                self.plugin_name = name
            self.workers: int = max(1, sum(self.client.nthreads().values()))
            # Now, so that it reaches the scheduler before any task's event.
            self.client.subscribe_topic(self.topic, on_started)
            self.subscribed = True
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Close the client and LocalCluster parfn started; undo what it set up
        on a user's client, and leave that client open. Call it once."""
        client = self.client
        if not self.owns_client:
            # Leave the user's client as it was.
            if self.subscribed:
                with contextlib.suppress(Exception):
                    client.unsubscribe_topic(self.topic)
            if self.plugin_name is not None:
                with contextlib.suppress(Exception):
                    client.unregister_worker_plugin(self.plugin_name)
            return
        try:
            client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
            if self.markers is not None:
                self.markers.remove_all()
