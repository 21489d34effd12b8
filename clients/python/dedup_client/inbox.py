"""The inbox pattern: record the idempotency key in the same transaction as the side effect.

The sidecar guarantees no redelivery *after* an ack. An app that applies an effect and dies
before its ack lands gets the message again (``attempt > 1``). With an inbox, that second
delivery finds its key already recorded and skips the effect, so the effect happens once.

Example with SQLite (any database with transactions works the same way)::

    inbox = SQLiteInbox(sqlite3.connect("app.db"))
    async for msg in client.subscribe(["payments"]):
        inbox.apply(msg.idempotency_key, lambda db: db.execute("UPDATE ...", ...))
        msg.ack()       # also when apply() returned False: the effect is already there
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

_NAME_OK = set("abcdefghijklmnopqrstuvwxyz_0123456789")


class SQLiteInbox:
    """Parameters:
    db: the app's own connection; the inbox table lives next to the app's data.
    table: table name for processed keys.
    """

    def __init__(self, db: sqlite3.Connection, table: str = "dedup_inbox") -> None:
        if not table or set(table) - _NAME_OK:
            raise ValueError(f"table name {table!r} must be lowercase letters, digits and _")
        self._db = db
        self._table = table
        db.execute(f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        db.commit()

    def apply(self, key: str, effect: Callable[[sqlite3.Connection], object]) -> bool:
        """Run ``effect`` and record ``key`` atomically, unless ``key`` was recorded before.

        Returns True when the effect ran now, False when it had already been applied.
        If ``effect`` raises, nothing is recorded and the exception propagates.
        """
        db = self._db
        if db.in_transaction:
            db.commit()
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute(
                f"INSERT OR IGNORE INTO {self._table} (key, applied_at) VALUES (?, ?)", (key, time.time())
            )
            if cur.rowcount == 0:
                db.rollback()
                return False
            effect(db)
            db.commit()
            return True
        except BaseException:
            db.rollback()
            raise

    def seen(self, key: str) -> bool:
        row = self._db.execute(f"SELECT 1 FROM {self._table} WHERE key = ?", (key,)).fetchone()
        return row is not None

    def forget_before(self, cutoff: float) -> int:
        """Delete keys recorded before ``cutoff`` (epoch seconds); keep at least the dedup window."""
        cur = self._db.execute(f"DELETE FROM {self._table} WHERE applied_at < ?", (cutoff,))
        self._db.commit()
        return cur.rowcount
