"""SQLite dedup store: the durable, embedded default for a single sidecar instance.

WAL mode; each batch is one transaction. All database work runs on one dedicated thread, so the
event loop never blocks on disk and the connection is only ever used from one thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, TypeVar

from sidecar.errors import StoreUnavailable
from sidecar.store import rules
from sidecar.store.base import Claim, ClaimMode, Clock, PublishRecord, wall_clock_ms

T = TypeVar("T")
_CHUNK = 500  # stay well below SQLite's bound-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dedup_keys (
    key TEXT PRIMARY KEY,
    done INTEGER NOT NULL,
    owner TEXT NOT NULL,
    deadline INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    expires INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_keys_expires ON dedup_keys(expires);
CREATE TABLE IF NOT EXISTS publish_results (
    key TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    expires INTEGER NOT NULL
) WITHOUT ROWID;
"""


def _chunks(keys: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(keys), _CHUNK):
        yield keys[i : i + _CHUNK]


class SQLiteStore:
    """Parameters:
    path: database file; created with its directory if missing.
    synchronous: SQLite's ``synchronous`` pragma. FULL survives power loss; NORMAL survives a
        process crash (kill -9) but may lose the last commits on an OS crash.
    """

    name = "sqlite"
    shared = False

    def __init__(
        self,
        path: str | Path,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        clock: Clock = wall_clock_ms,
        retention_ms: int = 7 * 86_400_000,
    ) -> None:
        self._path = Path(path)
        self._clock = clock
        self._retention_ms = retention_ms
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dedup-sqlite")
        self._synchronous = synchronous
        self._db: sqlite3.Connection | None = None

    async def open(self) -> SQLiteStore:
        await self._run(self._open)
        return self

    def _open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"cannot open the SQLite dedup store at {self._path}: {exc} (setting: store.sqlite_path)"
            ) from exc
        self._db = db

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite dedup store error: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreUnavailable("the SQLite store is not open")
        return self._db

    def _load(self, db: sqlite3.Connection, keys: Sequence[str]) -> dict[str, rules.Entry]:
        found: dict[str, rules.Entry] = {}
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            for key, done, owner, deadline, attempt, expires in db.execute(
                f"SELECT key, done, owner, deadline, attempt, expires FROM dedup_keys WHERE key IN ({marks})",
                tuple(chunk),
            ):
                found[key] = rules.Entry(bool(done), owner, deadline, attempt, expires)
        return found

    def _apply(
        self, keys: Sequence[str], step: Callable[[rules.Entry | None, int], tuple[T, rules.Entry | None]]
    ) -> list[T]:
        db = self._conn()
        now = self._clock()
        db.execute("BEGIN IMMEDIATE")
        try:
            entries = self._load(db, keys)
            out: list[T] = []
            rows = []
            for key in keys:
                result, entry = step(entries.get(key), now)
                out.append(result)
                if entry is not None:
                    entries[key] = entry
                    rows.append(
                        (key, int(entry.done), entry.owner, entry.deadline, entry.attempt, entry.expires)
                    )
            db.executemany("INSERT OR REPLACE INTO dedup_keys VALUES (?, ?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    async def claim(
        self, keys: Sequence[str], owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM
    ) -> list[Claim]:
        retention = self._retention_ms

        def step(entry: rules.Entry | None, now: int) -> tuple[Claim, rules.Entry | None]:
            return rules.claim(entry, owner, now, lease_ms, retention, mode)

        return await self._run(lambda: self._apply(keys, step))

    async def complete(self, keys: Sequence[str], owner: str, retention_ms: int) -> list[bool]:
        def step(entry: rules.Entry | None, now: int) -> tuple[bool, rules.Entry | None]:
            return rules.complete(entry, owner, now, retention_ms)

        return await self._run(lambda: self._apply(keys, step))

    async def release(self, keys: Sequence[str], owner: str, delivered: bool = True) -> list[bool]:
        def step(entry: rules.Entry | None, now: int) -> tuple[bool, rules.Entry | None]:
            return rules.release(entry, owner, now, delivered)

        return await self._run(lambda: self._apply(keys, step))

    async def publish_lookup(self, keys: Sequence[str]) -> list[PublishRecord | None]:
        def lookup() -> list[PublishRecord | None]:
            db = self._conn()
            now = self._clock()
            found: dict[str, str] = {}
            for chunk in _chunks(keys):
                marks = ",".join("?" * len(chunk))
                found.update(
                    db.execute(
                        f"SELECT key, record FROM publish_results WHERE key IN ({marks}) AND expires > ?",
                        (*chunk, now),
                    ).fetchall()
                )
            return [PublishRecord.decode(found[k]) if k in found else None for k in keys]

        return await self._run(lookup)

    async def publish_record(
        self, records: Sequence[tuple[str, PublishRecord]], retention_ms: int
    ) -> list[PublishRecord]:
        def store() -> list[PublishRecord]:
            db = self._conn()
            now = self._clock()
            out = []
            db.execute("BEGIN IMMEDIATE")
            try:
                for key, record in records:
                    row = db.execute(
                        "SELECT record FROM publish_results WHERE key = ? AND expires > ?", (key, now)
                    ).fetchone()
                    if row is None:
                        db.execute(
                            "INSERT OR REPLACE INTO publish_results VALUES (?, ?, ?)",
                            (key, record.encode(), now + retention_ms),
                        )
                    out.append(PublishRecord.decode(row[0]) if row else record)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return out

        return await self._run(store)

    async def purge(self) -> int:
        def purge() -> int:
            db = self._conn()
            now = self._clock()
            n = db.execute("DELETE FROM dedup_keys WHERE expires <= ?", (now,)).rowcount
            n += db.execute("DELETE FROM publish_results WHERE expires <= ?", (now,)).rowcount
            return int(n)

        return await self._run(purge)

    async def ping(self) -> None:
        await self._run(lambda: self._conn().execute("SELECT 1").fetchone())

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)
