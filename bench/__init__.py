"""The benchmarks: the sidecar measured against the raw confluent-kafka client in the same run.

- ``common``: the preloaded data, a sidecar in its own process, CPU accounting from /proc.
- ``scenarios``: what is measured, one module per path (consume, publish, latency, scaling,
  per call, capacity).
- ``runner``: the full run (``python -m bench``; scripts/bench.sh wraps it).
- ``report``: docs/BENCHMARKS.md and its plot, from bench/results.json.
- ``tools``: the investigations around them (A/B of two builds, cores, py-spy profiles, Redis
  per key, the dashboard's picture).
- ``ceiling.py`` and ``producer.py`` are processes the scenarios start by path.

Run from the repository's root with ``python -m``. The package imports the sidecar, its Python
client and ``deploy/local/services``; nothing outside it imports the package but its own tests.
"""
