"""The process backend, parfn's main engine: worker processes it owns, one manager thread.

How a call travels (each step names the module that does it)::

    caller thread                       manager thread                    worker (_worker)
    -------------                       --------------                    ----------------
    submit(job): pickle the arguments
      (_dispatch.prepare)
      an idle worker, nothing queued:
        write Batch to its pipe ------------------------------------->  run the items,
      otherwise: append to _queue,                                      writing its status
        write a byte to the wakeup pipe ->  select() wakes on:           slot as each starts
                                             the wakeup pipe: dispatch
                                               Batch frames ------------>
                                               (_dispatch)
                                             a worker's pipe: Results <-- Results(Done, ...)
                                               -> job.sink.deliver()
                                                  -> Task / map engine
                                               (_results)
                                             a worker's sentinel: it died
                                               -> read its status slot:
                                                  fail that one item,
                                                  requeue the rest
                                                  (_deaths),
                                                  ask the zygote for a
                                                  replacement (_start)
                                             a deadline (timeout) passed:
                                               kill that worker, as above
                                               (_timeouts)

    apply(): submit_and_wait(job) borrows an idle worker: the caller's thread
    writes the Batch and reads the Results itself (_talk); the manager only
    watches that worker's sentinel until the caller gives it back.

Workers (start method "fork", the default on Linux) are forked by the pool's
zygote, a process the caller forked when the pool started (``_zygote``): all
of them, first and replacements, are copies of the same single-threaded state.
By "spawn" or "forkserver", ``multiprocessing`` starts them.

One duplex pipe per worker (no shared queue a dying worker could leave
locked), non-blocking on the parent's side, so the manager never blocks on a
worker. What crosses it are the small named messages of ``parfn._wire.protocol``;
a worker's log records and prints (``parfn._wire.capture``) travel on it too,
before the results that follow them, and are shown by whichever thread reads
the pipe (``parfn.backends._replay``).

The modules, each a concern; arrows point one way, down::

    _backend      ProcessPool: the public calls, _talk, the manager loop
      -> _dispatch    pickle jobs, send Batches          --+
      -> _messages    a worker's messages, in order        |
      -> _results     Results -> sinks                     |
      -> _timeouts    per-item deadlines                   +-> _state: records,
      -> _deaths      dead workers' runs -> _start         |   PoolState (which
      -> _start       worker processes -> _zygote/_worker--+   ProcessPool extends)
    _zygote       the process that forks the workers, and the parent's handles on them
    _forksafe     what every forked child resets (parfn's locks, the pools' descriptors)
    _worker       the worker process's main loop (imports only _channel and the wire)
    _channel      framed I/O on the two ends of a worker's pipe

``ProcessPool`` is loaded on first use: a worker process imports this package
for ``_worker`` and must not pay for the parent's side.
"""

from __future__ import annotations

from ..._typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._backend import ProcessPool as ProcessPool

__all__ = ("ProcessPool",)


def __getattr__(name: str) -> Any:
    if name == "ProcessPool":
        from ._backend import ProcessPool

        return ProcessPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
