"""The process around the engine: the command line, the composition root and the workers.

- ``cli``: the entry point (``dedup-sidecar``): run, check-config, status and the admin commands.
- ``admin_cli``: the admin commands that talk to a running sidecar or to Kafka and the store.
- ``app``: the composition root: builds every part from ``Settings``, orders start-up and stop,
  and answers readiness.
- ``stores``: opens the configured dedup store.
- ``workers``: ``server.workers``: a supervisor and its worker processes on one port.
- ``build``: which compiled modules this install has.

This is the top of the import graph: it may import every other package; nothing in the sidecar
imports it (the API's admin service takes what it needs from ``app`` as arguments).
"""
