"""What one Redis node spends per key: the store's claim and complete against plain commands.

Usage::

    python -m bench.tools.redis_ops [--keys 100000] [--rounds 3] [--appendonly everysec|no]

Starts a redis-server (deploy/local/services) and, in batches of 500 keys, measures the CPU
the server spends (``INFO cpu``, user + system) per key for:

* the store's ``claim`` of new keys and ``complete`` of the claimed keys (RedisStore, the
  sidecar's own scripts): what each consumed record costs Redis;
* plain commands for comparison: a script that only walks its keys, ``GET`` of absent keys,
  ``SET ... PX`` of new keys and of existing ones from a script, and ``SET ... PX`` pipelined
  without a script.

The last lines say how much of claim + complete is the two key writes a record needs (a claim
and a done mark). Prints the median of the rounds for each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from bench.common import services
from sidecar.store.redis import RedisStore

BATCH = 500
OWNER = "orders-app-7f9c4d8b6-x2k4q-w0"  # the length of a pod-named owner id
VALUE = f"0|{OWNER}|1796259173087|1"
WEEK_MS = 7 * 86_400_000


def server_cpu(server: services.RedisServer) -> float:
    fields = dict(line.split(":", 1) for line in server.cli("INFO", "cpu").splitlines() if ":" in line)
    return float(fields["used_cpu_sys"]) + float(fields["used_cpu_user"])


def fresh_keys(n: int) -> list[list[str]]:
    tag = uuid.uuid4().hex[:8]
    keys = [f"dedup:k:10:orders-app:orders:{tag}-{i:08d}-0000-0000-00e8d4a51000" for i in range(n)]
    return [keys[i : i + BATCH] for i in range(0, n, BATCH)]


async def per_key(
    server: services.RedisServer, batches: list[list[str]], step: Callable[[list[str]], Awaitable[object]]
) -> float:
    before = server_cpu(server)
    for batch in batches:
        await step(batch)
    return (server_cpu(server) - before) / sum(map(len, batches)) * 1e6


async def one_round(server: services.RedisServer, n: int) -> dict[str, float]:
    store = RedisStore(server.url, prefix=f"ops{uuid.uuid4().hex[:6]}")
    client = aioredis.Redis.from_url(server.url)
    try:
        walk = await client.script_load("local n = 0 for _ in ipairs(KEYS) do n = n + 1 end return n")
        get = await client.script_load("for _, k in ipairs(KEYS) do redis.call('GET', k) end return 0")
        set_px = await client.script_load(
            "for _, k in ipairs(KEYS) do redis.call('SET', k, ARGV[1], 'PX', ARGV[2]) end return 0"
        )

        def script(sha: str) -> Callable[[list[str]], Awaitable[object]]:
            return lambda keys: client.evalsha(sha, len(keys), *keys, VALUE, WEEK_MS)

        async def pipelined(keys: list[str]) -> object:
            pipe = client.pipeline(transaction=False)
            for k in keys:
                pipe.set(k, VALUE, px=WEEK_MS)
            return await pipe.execute()

        out: dict[str, float] = {}
        records = fresh_keys(n)
        out["store claim (new keys)"] = await per_key(
            server, records, lambda ks: store.claim(ks, OWNER, 35_000)
        )
        out["store complete (claimed keys)"] = await per_key(
            server, records, lambda ks: store.complete(ks, OWNER, WEEK_MS)
        )
        out["script walking its keys"] = await per_key(server, fresh_keys(n), script(walk))
        out["GET of absent keys, in a script"] = await per_key(server, fresh_keys(n), script(get))
        written = fresh_keys(n)
        out["SET PX of new keys, in a script"] = await per_key(server, written, script(set_px))
        out["SET PX of existing keys, in a script"] = await per_key(server, written, script(set_px))
        out["SET PX of new keys, pipelined"] = await per_key(server, fresh_keys(n), pipelined)
        return out
    finally:
        await store.close()
        await client.aclose()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--appendonly", choices=["everysec", "no"], default="everysec")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="redis-ops-") as tmp:
        server = services.RedisServer.start(Path(tmp), appendonly=args.appendonly)
        try:
            rounds = []
            for i in range(args.rounds):
                rounds.append(await one_round(server, args.keys))
                print(f"round {i + 1} of {args.rounds} done", file=sys.stderr)
        finally:
            server.stop()
    print(
        f"Redis CPU µs per key, batches of {BATCH}, appendonly {args.appendonly}, medians of {args.rounds}:"
    )
    medians = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
    for name, value in medians.items():
        runs = ", ".join(f"{r[name]:.2f}" for r in rounds)
        print(f"  {name:40s} {value:6.2f}   ({runs})")
    record = medians["store claim (new keys)"] + medians["store complete (claimed keys)"]
    writes = medians["SET PX of new keys, in a script"] + medians["SET PX of existing keys, in a script"]
    print(f"  a consumed record (claim + complete): {record:.2f}; its two key writes alone: {writes:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
