"""The app under test for the fault suite, run as its own process.

For every delivery it applies an *effect* — one row in a SQLite ledger keyed by idempotency key —
and then acks. Two variants:

* ``naive``: insert the effect, then ack. A crash between the two applies the effect again on
  redelivery: this measures the window the contract admits (point 4).
* ``inbox``: record the key in the same transaction as the effect and skip keys already recorded
  (dedup_client.SQLiteInbox). Duplicated effects must be zero.

Usage: python -m tests.chaos.ledger_app SIDECAR LEDGER.db naive|inbox [--stall-every N --stall S]
       [--work-ms MS] [--concurrent] [--ack-path batched|unary|stream]

``--ack-path``: how acks travel. ``batched`` (the client's default) gathers them into Ack calls;
``unary`` makes one Ack call per message, as an app without a client library does (the sidecar
groups concurrent calls); ``stream`` writes them on the StreamingSubscribe call that brought the
messages.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import sqlite3
import time
from typing import Any

import grpc
from dedup_client import AckError, DedupClient, SQLiteInbox


def open_ledger(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    # A commit is durable against the app's own death (the faults kill processes, never the
    # machine) without an fsync per commit: WAL pages are in the OS's cache once written. With
    # the default FULL, the two apps of a group spent most of their time in fsync and in each
    # other's write lock (about 88 records/s each instead of about 250, measured alone); in the
    # cluster rows the app, not the sidecar, set the pace and filled every stream's window.
    db.execute("PRAGMA synchronous=NORMAL")
    # kkey/part/off: the delivery's Kafka key and coordinates (the ordering check reads them).
    db.execute(
        "CREATE TABLE IF NOT EXISTS effects "
        "(key TEXT, attempt INTEGER, at REAL, kkey BLOB, part INTEGER, off INTEGER)"
    )
    db.execute("CREATE TABLE IF NOT EXISTS deliveries (key TEXT, attempt INTEGER, at REAL, deadline REAL)")
    db.execute("CREATE TABLE IF NOT EXISTS acks (key TEXT, result TEXT, at REAL)")
    db.commit()
    return db


def record_ack(db: sqlite3.Connection, key: str, fut: asyncio.Future[Any]) -> None:
    """Record each Ack's outcome with its time (the F8 check reads these)."""
    result = "error" if fut.exception() else fut.result().name
    db.execute("INSERT INTO acks VALUES (?, ?, ?)", (key, result, time.time()))
    db.commit()


ACK_PATHS: dict[str, dict[str, Any]] = {
    "batched": {},
    "unary": {"coalesce_acks": False},
    "stream": {"streaming": True},
}


async def run(
    target: str,
    path: str,
    variant: str,
    stall_every: int,
    stall_s: float,
    work_s: float,
    concurrent: bool,
    ack_path: str = "batched",
) -> None:
    """``concurrent``: work on every delivery at once, each after a random wait of up to twice
    ``work_s`` (the ordering rows: only the sidecar's ordering keeps a key's effects in order)."""
    db = open_ledger(path)
    inbox = SQLiteInbox(db) if variant == "inbox" else None
    seen = 0
    rng = random.Random()

    async def handle(msg: Any, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        now = time.time()
        key, attempt = msg.idempotency_key, msg.attempt
        db.execute("INSERT INTO deliveries VALUES (?, ?, ?, ?)", (key, attempt, now, msg.deadline_ms / 1000))
        row = (key, attempt, now, msg.key, msg.partition, msg.offset)

        def effect(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO effects VALUES (?, ?, ?, ?, ?, ?)", row)

        if inbox is not None:
            inbox.apply(key, effect)
        else:
            effect(db)
            db.commit()
        if not concurrent:
            await asyncio.sleep(work_s)  # the effect takes a while: deliveries stay in flight
        if stall_every and seen % stall_every == 0:
            await asyncio.sleep(stall_s)  # F5: stall past the lease
        fut = msg.ack()
        fut.add_done_callback(functools.partial(record_ack, db, key))

    while True:
        tasks: set[asyncio.Task[None]] = set()
        try:
            async with DedupClient(target, ack_linger=0.002, **ACK_PATHS[ack_path]) as client:
                async for msg in client.subscribe(max_in_flight=200):
                    seen += 1
                    if concurrent:
                        task = asyncio.create_task(handle(msg, rng.random() * 2 * work_s))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    else:
                        await handle(msg, 0.0)
        except (grpc.aio.AioRpcError, AckError, OSError):
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0.2)  # the sidecar is gone or restarting: reconnect


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("ledger")
    ap.add_argument("variant", choices=["naive", "inbox"])
    ap.add_argument("--stall-every", type=int, default=0)
    ap.add_argument("--stall", type=float, default=0.0)
    ap.add_argument("--work-ms", type=float, default=3.0, help="time each effect takes")
    ap.add_argument("--concurrent", action="store_true", help="work on all deliveries at once")
    ap.add_argument("--ack-path", choices=sorted(ACK_PATHS), default="batched")
    a = ap.parse_args()
    asyncio.run(
        run(a.target, a.ledger, a.variant, a.stall_every, a.stall, a.work_ms / 1000, a.concurrent, a.ack_path)
    )


if __name__ == "__main__":
    main()
