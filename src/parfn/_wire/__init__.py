"""The wire: what every engine shares to move a call and its outcome.

The bottom of the package: these modules import nothing from the front end
or the backends, and a worker process imports only them and its engine's
worker loop.

* ``errors``: every error parfn raises (imports nothing else from parfn);
* ``protocol``: the small named messages between the parent and a worker process;
* ``serialize``: pickling arguments, results, functions and exceptions
  (pickle protocol 5, cloudpickle for what has no importable name);
* ``shm``: big buffers through shared memory instead of the pipe;
* ``execute``: running a run of items, the one loop every backend shares;
* ``capture``: a worker's prints and log records, sent to the parent as they happen;
* ``logs``: its log records made into messages (loaded when ``logging`` is).
"""
