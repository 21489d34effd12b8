from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from dedup_client import SQLiteInbox


def ledger(tmp_path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(tmp_path / "app.db")
    db.execute("CREATE TABLE ledger (key TEXT, amount INTEGER)")
    db.commit()
    return db


def test_effect_applies_once_per_key(tmp_path: Path) -> None:
    db = ledger(tmp_path)
    inbox = SQLiteInbox(db)

    def pay(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO ledger VALUES ('k', 10)")

    assert inbox.apply("k", pay) is True
    assert inbox.apply("k", pay) is False  # the redelivery after a crash before the ack
    assert db.execute("SELECT COUNT(*) FROM ledger").fetchone() == (1,)
    assert inbox.seen("k")


def test_failed_effect_records_nothing(tmp_path: Path) -> None:
    db = ledger(tmp_path)
    inbox = SQLiteInbox(db)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO ledger VALUES ('k', 1)")
        raise RuntimeError("downstream failed")

    with pytest.raises(RuntimeError):
        inbox.apply("k", broken)
    assert not inbox.seen("k")
    assert db.execute("SELECT COUNT(*) FROM ledger").fetchone() == (0,)


def test_survives_reopen(tmp_path: Path) -> None:
    SQLiteInbox(ledger(tmp_path)).apply("k", lambda c: None)
    assert SQLiteInbox(sqlite3.connect(tmp_path / "app.db")).seen("k")


def test_rejects_odd_table_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="table name"):
        SQLiteInbox(sqlite3.connect(":memory:"), table="x; DROP TABLE y")
