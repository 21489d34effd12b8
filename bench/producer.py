"""Produce records at a fixed rate, each carrying its send time; run as its own process.

Usage: python bench/producer.py BOOTSTRAP TOPIC RATE SECONDS TAG [LINGER_MS]

LINGER_MS defaults to 5, librdkafka's own default: records sent within 5 ms share a request.
With 0 every record is its own produce request, which at 2,000 msg/s keeps this 2-core machine's
broker near a core and the machine saturated (see docs/BENCHMARKS.md).

The latency benchmark runs the producer in a separate process so that its Python work never
competes for a GIL with the consumer being measured (raw client or sidecar client).
"""

from __future__ import annotations

import sys
import time

from confluent_kafka import Producer


def main(bootstrap: str, topic: str, rate: float, seconds: float, tag: str, linger_ms: int = 5) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms})
    p.list_topics(topic, timeout=30)  # metadata first: the first records should not wait for it
    interval = 1.0 / rate
    start = time.perf_counter()
    nxt, i = start, 0
    while nxt < start + seconds:
        now = time.perf_counter()
        if now < nxt:
            time.sleep(min(nxt - now, 0.001))
            continue
        p.produce(
            topic, str(time.time()).encode().ljust(64), headers=[("idempotency-key", f"{tag}-{i}".encode())]
        )
        p.poll(0)
        i += 1
        nxt += interval
    p.flush(30)


if __name__ == "__main__":
    linger = int(sys.argv[6]) if len(sys.argv) > 6 else 5
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5], linger)
