"""kafka-dedup-sidecar: exactly-once effects from Kafka for apps in any language, over gRPC.

The packages, from the bottom of the import graph to its top (each imports only those before
it, and the foundations ``errors``, ``config``, ``groupcommit`` and ``testing_hooks``):

- ``offsets``: which offsets of a partition are settled. Pure.
- ``observability``: metrics, logs, traces, outages.
- ``store``: the dedup stores (memory, SQLite, Redis) behind one protocol.
- ``kafka``: confluent-kafka behind a poll thread and an async producer.
- ``engine``: the record path: claims, streams, acks, commits (compiled with mypyc).
- ``publish``: idempotent Publish.
- ``api``: the gRPC face.
- ``process``: the command line, the composition root and the workers.

docs/ARCHITECTURE.md has the map and the decisions.
"""

__version__ = "0.1.0"
