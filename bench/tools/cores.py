"""How the sidecar scales with worker processes (``server.workers``) and the cores they may use.

Usage::

    python -m bench.tools.cores [--records 200000] [--rounds 2]

Each round runs, on one preloaded topic of 6 partitions, the rows of the full benchmark's
"Workers and cores" section (bench/scenarios/scaling.py ``workers_rows``): consume with 1 and 2 workers pinned
to one core (``taskset -c 0``) and free on every core, each after a raw consumer run of its own,
then PublishBatch with 1 and 2 workers after a raw producer run. Prints the rows as JSON. The
broker, Redis and the client are never pinned: on a 2-core machine they share the cores with
the sidecar.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import log, preload, services
from bench.scenarios.scaling import workers_rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if shutil.which("taskset") is None:
        print("taskset (util-linux) is needed to pin the sidecar", file=sys.stderr)
        return 2
    n, n_pub = args.records, max(5_000, args.records // 2)
    rounds: list[dict[str, object]] = []
    with (
        tempfile.TemporaryDirectory(prefix="dedup-cores-") as tmp,
        services.running(Path(tmp), quick_start=False) as (kafka, redis),
    ):
        work = Path(tmp)
        store = {"DEDUP_STORE__BACKEND": "redis", "DEDUP_STORE__REDIS_URL": redis.url}
        log(f"preloading {n} records")
        preload(kafka, "cores6", 6, n, "c6")
        kafka.create_topic("corespub", 6)
        for i in range(args.rounds):
            log(f"round {i + 1}")
            rounds.append(workers_rows(kafka, ("cores6", "corespub"), (n, n_pub), store, work))
    print(json.dumps({"records": n, "at": time.ctime(), "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
