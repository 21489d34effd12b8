"""Investigations beside the benchmark, each run on its own with ``python -m bench.tools.NAME``:
``ab`` (two builds, CPU per record), ``cores`` (workers against pinned cores), ``profile``
(py-spy), ``redis_ops`` (what Redis spends per key), ``dashboard`` (docs/DASHBOARD.png).
They import ``bench.common`` and the scenarios; nothing imports them."""
