"""The dask backend: Jobs run as tasks on a Dask distributed cluster.

How a job travels::

    submit(job): pickle the function and the items (an error: raised or delivered)
      |   one run per Job (a map chunk), or one per item when it has a timeout;
      |   on a LocalCluster parfn started, a run waits here for a free worker thread
      v
    _dispatch: sink.start(), client.submit(run_remote, ..., pure=False)
      v
    Dask scheduler --> worker thread: run_remote -> run_items -> pickled outcomes
      |                (with a timeout, first a "started" event back to the client)
      v
    Dask-Callback-Thread: Collector.on_done queues the run for the collector
      v
    parfn-dask-collector: one gather for every run done meanwhile -> sink.deliver;
      an item that raised or whose worker died, with retries left: submitted again
    parfn-dask-deadlines: TaskTimeout at an item's deadline, armed by its "started"
      event; its Dask future is cancelled

What it guarantees, and what it does not (for the README's backend table):

* A remote exception keeps its type and the worker's traceback text; a worker
  that dies mid-task fails that item with :class:`WorkerCrashed` (from Dask's
  ``KilledWorker``) and the cluster's nanny replaces the worker.
* ``retries`` are counted here, in the caller, so an item runs at most
  ``retries + 1`` times whether it raised, crashed or timed out; except that a
  cluster parfn did not start re-runs a task whose worker died up to its own
  ``distributed.scheduler.allowed-failures`` times (default 3) before parfn
  hears of it (those runs count against ``retries``, but can exceed it), and
  that when a worker dies during a many-item chunk, its items are run again
  one by one to find the one that crashed, which so runs once more.
* On a LocalCluster parfn started, ``allowed-failures`` is 0, and a marker
  file that exists while a task runs tells parfn which of the tasks a dead
  worker held was running: the others run again, uncounted. parfn sends at
  most two tasks per worker thread to Dask and keeps the rest here, where
  they can still be cancelled (``sink.start()`` is called as a task is sent).
  On another cluster every task is sent at once, so ``cancel()`` of a task
  returns False there.
* ``timeout`` is counted from when the client hears that the item started on
  a worker (a few milliseconds after it did). At the deadline the caller gets
  :class:`TaskTimeout` and the Dask future is cancelled, but Dask cannot stop
  a running thread: the item runs on in its worker to its end, its result
  dropped. So ``can_stop_running`` is False.
* ``initializer`` runs once in each worker process (not each thread), as it
  starts or joins, through a Dask worker plugin removed again at shutdown.
* A LocalCluster started here spawns its workers, which import the main
  module: a script must make the pool under ``if __name__ == "__main__":``,
  as with Dask itself. parfn must be importable on the cluster's workers.

``distributed`` is imported only when a DaskBackend is created.

The modules, each importing only those below it:

* ``_backend``: DaskBackend, the Backend protocol: runs in flight, outcomes,
  retries, timeouts, cancel and shutdown.
* ``_collector``: the thread that gathers done tasks' results in batches.
* ``_cluster``: the options, and the client and cluster parfn holds: connecting,
  the initializer plugin, the marker files, releasing.
* ``_deadlines``: the thread that expires timed items.
* ``_failures``: Dask's failures mapped to parfn's errors.
* ``_runs``: what one task carries: a run of items, pickled, and its key.
* ``_remote``: what runs in the Dask worker.
"""

from __future__ import annotations

from ._backend import DaskBackend as DaskBackend

__all__ = ("DaskBackend",)
