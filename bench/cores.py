"""How consume throughput scales with sidecar processes and the cores they may use.

Usage::

    python bench/cores.py [--records 200000] [--rounds 2]

Until ``server.workers`` exists, N sidecar processes in one consumer group, with the batched
client reading from all of them, are the shape N workers would have. Each round runs, on one
preloaded topic of 6 partitions: the raw consumer, then 1 and 2 sidecars pinned to one core
(``taskset -c 0``), then 1 and 2 sidecars free to use both cores. Prints the rates, the ratios to
the raw consumer of the same round and the sidecars' CPU per record. The broker, Redis and the
client are never pinned: on a 2-core machine they share the cores with the sidecars.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench
import services

SHAPES = [(1, "0"), (2, "0"), (1, ""), (2, "")]  # (sidecar processes, taskset cores; "" = any)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if shutil.which("taskset") is None:
        print("taskset (util-linux) is needed to pin the sidecars", file=sys.stderr)
        return 2
    n = args.records
    rows: list[dict[str, object]] = []
    with (
        tempfile.TemporaryDirectory(prefix="dedup-cores-") as tmp,
        services.running(Path(tmp), quick_start=False) as (kafka, redis),
    ):
        work = Path(tmp)
        store = {"DEDUP_STORE__BACKEND": "redis", "DEDUP_STORE__REDIS_URL": redis.url}
        bench.log(f"preloading {n} records")
        bench.preload(kafka, "cores6", 6, n, "c6")
        for i in range(args.rounds):
            raw = bench.raw_consume(kafka, "cores6", n)
            for procs, cores in SHAPES:
                wrap = ["taskset", "-c", cores] if cores else []
                name = f"{procs} sidecar(s), {'core ' + cores if cores else 'both cores'}"
                r = bench.sidecar_consume(kafka, "cores6", n, store, work, name, replicas=procs, wrap=wrap)
                row = {
                    "round": i + 1,
                    "shape": name,
                    "rate": round(r.rate),
                    "raw_rate": round(raw.rate),
                    "ratio": round(r.rate / raw.rate, 3),
                    "cpu_us": r.extra["cpu_us"],
                }
                rows.append(row)
                bench.log(json.dumps(row))
    print(json.dumps({"records": n, "at": time.ctime(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
