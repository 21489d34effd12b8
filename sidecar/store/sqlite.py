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
from sidecar.store.base import (
    Claim,
    ClaimMode,
    Clock,
    KeyInfo,
    PublishRecord,
    publish_claim_key,
    wall_clock_ms,
)

T = TypeVar("T")
#: What a batch operation does to one key's entry: (its answer, the entry to write or None).
Step = Callable[[rules.Entry | None, int], tuple[T, rules.Entry | None]]
_CHUNK = 500  # stay well below SQLite's bound-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dedup_keys (
    key TEXT PRIMARY KEY,
    done INTEGER NOT NULL,
    owner TEXT NOT NULL,
    deadline INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0
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


def _add_failures_column(db: sqlite3.Connection) -> None:
    """Bring a database from before ``failures`` existed up to date (its keys start at 0). Two
    workers opening it at once may both try: the loser finds the column there."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(dedup_keys)")}
    if "failures" not in columns:
        try:
            db.execute("ALTER TABLE dedup_keys ADD COLUMN failures INTEGER NOT NULL DEFAULT 0")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise


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
            _add_failures_column(db)
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
            for key, done, owner, deadline, attempt, expires, failures in db.execute(
                "SELECT key, done, owner, deadline, attempt, expires, failures FROM dedup_keys"
                f" WHERE key IN ({marks})",
                tuple(chunk),
            ):
                found[key] = rules.Entry(bool(done), owner, deadline, attempt, expires, failures)
        return found

    def _transaction(self, work: Callable[[sqlite3.Connection, int], T]) -> T:
        """Run ``work(db, now)`` in one write transaction."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            out = work(db, self._clock())
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    def _step(
        self,
        db: sqlite3.Connection,
        now: int,
        keys: Sequence[str],
        step: Step[T],
    ) -> list[T]:
        """Apply ``step`` to each key's entry (inside the caller's transaction)."""
        entries = self._load(db, keys)
        out: list[T] = []
        rows = []
        for key in keys:
            result, entry = step(entries.get(key), now)
            out.append(result)
            if entry is not None:
                entries[key] = entry
                rows.append(
                    (
                        key,
                        int(entry.done),
                        entry.owner,
                        entry.deadline,
                        entry.attempt,
                        entry.expires,
                        entry.failures,
                    )
                )
        db.executemany(
            "INSERT OR REPLACE INTO dedup_keys (key, done, owner, deadline, attempt, expires, failures)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        return out

    def _apply(self, keys: Sequence[str], step: Step[T]) -> list[T]:
        return self._transaction(lambda db, now: self._step(db, now, keys, step))

    @staticmethod
    def _records(db: sqlite3.Connection, now: int, keys: Sequence[str]) -> dict[str, PublishRecord]:
        found: dict[str, PublishRecord] = {}
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            for key, record in db.execute(
                f"SELECT key, record FROM publish_results WHERE key IN ({marks}) AND expires > ?",
                (*chunk, now),
            ):
                found[key] = PublishRecord.decode(record)
        return found

    def _claim_step(self, owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM) -> Step[Claim]:
        retention = self._retention_ms

        def step(entry: rules.Entry | None, now: int) -> tuple[Claim, rules.Entry | None]:
            return rules.claim(entry, owner, now, lease_ms, retention, mode)

        return step

    @staticmethod
    def _release_step(owner: str, delivered: bool = True, failed: bool = False) -> Step[bool]:
        def step(entry: rules.Entry | None, now: int) -> tuple[bool, rules.Entry | None]:
            return rules.release(entry, owner, now, delivered, failed)

        return step

    async def claim(
        self, keys: Sequence[str], owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM
    ) -> list[Claim]:
        step = self._claim_step(owner, lease_ms, mode)
        return await self._run(lambda: self._apply(keys, step))

    async def complete(self, keys: Sequence[str], owner: str, retention_ms: int) -> list[int]:
        def step(entry: rules.Entry | None, now: int) -> tuple[int, rules.Entry | None]:
            return rules.complete(entry, owner, now, retention_ms)

        return await self._run(lambda: self._apply(keys, step))

    async def release(
        self, keys: Sequence[str], owner: str, delivered: bool = True, failed: bool = False
    ) -> list[bool]:
        step = self._release_step(owner, delivered, failed)
        return await self._run(lambda: self._apply(keys, step))

    async def publish_begin(
        self, keys: Sequence[str], owner: str, lease_ms: int
    ) -> list[PublishRecord | Claim]:
        step = self._claim_step(owner, lease_ms)

        def begin(db: sqlite3.Connection, now: int) -> list[PublishRecord | Claim]:
            found = self._records(db, now, keys)
            missing = [k for k in dict.fromkeys(keys) if k not in found]
            claimed = self._step(db, now, [publish_claim_key(k) for k in missing], step)
            claims = dict(zip(missing, claimed, strict=True))
            return [found.get(k) or claims[k] for k in keys]

        return await self._run(lambda: self._transaction(begin))

    async def publish_finish(
        self, entries: Sequence[tuple[str, PublishRecord | None]], owner: str, retention_ms: int
    ) -> list[PublishRecord | None]:
        release = self._release_step(owner)

        def finish(db: sqlite3.Connection, now: int) -> list[PublishRecord | None]:
            found: dict[str, PublishRecord] = self._records(db, now, [k for k, _ in entries])
            rows = []
            for key, record in entries:
                if key not in found and record is not None:
                    found[key] = record
                    rows.append((key, record.encode(), now + retention_ms))
            db.executemany("INSERT OR REPLACE INTO publish_results VALUES (?, ?, ?)", rows)
            self._step(db, now, list(dict.fromkeys(publish_claim_key(k) for k, _ in entries)), release)
            return [found.get(k) for k, _ in entries]

        return await self._run(lambda: self._transaction(finish))

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

    async def inspect(self, key: str, publish_key: str) -> KeyInfo:
        def read() -> KeyInfo:
            db, now = self._conn(), self._clock()
            row = db.execute(
                "SELECT record FROM publish_results WHERE key = ? AND expires > ?", (publish_key, now)
            ).fetchone()
            published = PublishRecord.decode(row[0]) if row else None
            return rules.describe(self._load(db, [key]).get(key), now, published)

        return await self._run(read)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)
