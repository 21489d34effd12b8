"""One ``/metrics`` for a sidecar of several workers.

With ``server.workers`` above 1 the supervisor serves ``server.metrics_listen`` itself (over
HTTPS when ``server.metrics_tls_*`` is set), and each worker serves its own metrics over plain
HTTP on a loopback port the supervisor picked. A scrape of the supervisor reads every worker's
metrics at that moment and answers with all of them, each sample labelled ``worker="i"``, so
Prometheus scrapes one port per pod whatever the number of workers, and ``sum without (worker)``
gives the sidecar's totals. The supervisor adds two families of its own: whether it could read
each worker (``dedup_worker_up``) and how often it restarted each (``dedup_worker_restarts``).
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger(__name__)

#: How long a scrape waits for one worker's metrics (a worker that is paused or overloaded
#: shows as down for that scrape rather than stalling Prometheus).
SCRAPE_TIMEOUT_S = 2.0


def _read(address: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT_S) as reply:
            return str(reply.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        log.debug("no metrics from the worker at %s: %s", address, exc)
        return None


class WorkersCollector(Collector):
    """Parameters:
    addresses: each worker's metrics address (``host:port``), in worker order.
    restarts: how often the supervisor has restarted each worker, read at every scrape.
    """

    def __init__(self, addresses: Sequence[str], restarts: Callable[[], Sequence[int]]) -> None:
        self._addresses = list(addresses)
        self._restarts = restarts

    def collect(self) -> Iterator[Metric]:
        with ThreadPoolExecutor(len(self._addresses), thread_name_prefix="dedup-scrape") as pool:
            texts = list(pool.map(_read, self._addresses))
        up = GaugeMetricFamily(
            "dedup_worker_up",
            "1 when the supervisor read the worker's metrics for this scrape, else 0",
            labels=["worker"],
        )
        restarted = CounterMetricFamily(
            "dedup_worker_restarts",
            "Times the supervisor started the worker again after it died",
            labels=["worker"],
        )
        for i, n in enumerate(self._restarts()):
            restarted.add_metric([str(i)], n)
        merged: dict[str, Metric] = {}
        for i, text in enumerate(texts):
            up.add_metric([str(i)], 0 if text is None else 1)
            if text is None:
                continue
            worker = str(i)
            for family in text_string_to_metric_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                into.samples.extend(
                    Sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp, s.exemplar)
                    for s in family.samples
                )
        yield up
        yield restarted
        yield from merged.values()


def registry(addresses: Sequence[str], restarts: Callable[[], Sequence[int]]) -> CollectorRegistry:
    """The registry the supervisor's ``/metrics`` serves."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(WorkersCollector(addresses, restarts))
    return reg
