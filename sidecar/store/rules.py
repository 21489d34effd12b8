"""The claim/complete/release state transitions, as pure functions over one key's entry.

The memory and SQLite stores apply these in Python; the Redis store runs the same rules in Lua
(sidecar/store/redis.py). The contract suite checks that all three agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.store.base import IN_TIME, LATE, Claim, ClaimMode, ClaimStatus, KeyInfo, PublishRecord


@dataclass(slots=True)
class Entry:
    done: bool
    owner: str
    deadline: int  # lease deadline when claimed (0 when released), epoch ms
    attempt: int
    expires: int  # when the entry itself may be forgotten, epoch ms
    failures: int = 0  # failed deliveries (Claim.failures)


def live(entry: Entry | None, now: int) -> Entry | None:
    return entry if entry is not None and entry.expires > now else None


def claim(
    entry: Entry | None,
    owner: str,
    now: int,
    lease_ms: int,
    retention_ms: int,
    mode: ClaimMode = ClaimMode.CLAIM,
) -> tuple[Claim, Entry]:
    entry = live(entry, now)
    if entry is None:
        return Claim(ClaimStatus.NEW, 1), Entry(False, owner, now + lease_ms, 1, now + retention_ms)
    if entry.done:
        return Claim(ClaimStatus.DONE, entry.attempt, entry.failures), entry
    if entry.deadline > now:
        if entry.owner == owner:
            entry.deadline = now + lease_ms
            if mode is ClaimMode.REDELIVER:
                entry.attempt += 1
                entry.failures += 1
            return Claim(ClaimStatus.NEW, entry.attempt, entry.failures), entry
        return Claim(ClaimStatus.BUSY, entry.attempt, entry.failures), entry
    # Expired or released: the next attempt belongs to whoever claims first (unless the owner
    # renews a claim it never delivered under, and nobody took it meanwhile). The owner's own
    # redelivery after its lease ran out is still a failed delivery; a takeover is not.
    same = entry.owner == owner
    if same and mode is ClaimMode.REDELIVER:
        entry.failures += 1
    entry.owner, entry.deadline = owner, now + lease_ms
    entry.attempt = max(entry.attempt, 1) if same and mode is ClaimMode.RENEW else entry.attempt + 1
    entry.expires = max(entry.expires, now + lease_ms)
    return Claim(ClaimStatus.NEW, entry.attempt, entry.failures), entry


def describe(entry: Entry | None, now: int, published: PublishRecord | None = None) -> KeyInfo:
    """An entry as operators see it (KeyInfo)."""
    entry = live(entry, now)
    if entry is None:
        return KeyInfo("absent", published=published)
    state = "done" if entry.done else "claimed" if entry.deadline > now else "released"
    lease = entry.deadline if state == "claimed" else 0
    return KeyInfo(state, entry.owner, lease, entry.expires, entry.attempt, published, entry.failures)


def complete(entry: Entry | None, owner: str, now: int, retention_ms: int) -> tuple[int, Entry]:
    """Returns (result, new entry): IN_TIME, LATE, or the ms another owner's live claim still runs
    (see DedupStore.complete)."""
    entry = live(entry, now)
    if entry is not None and entry.done:
        return IN_TIME, entry
    if entry is None or entry.deadline <= now:
        result = LATE
    elif entry.owner != owner:
        result = entry.deadline - now
    else:
        result = IN_TIME
    attempt, failures = (entry.attempt, entry.failures) if entry is not None else (1, 0)
    return result, Entry(True, owner, now + retention_ms, attempt, now + retention_ms, failures)


def release(
    entry: Entry | None, owner: str, now: int, delivered: bool = True, failed: bool = False
) -> tuple[bool, Entry | None]:
    entry = live(entry, now)
    if entry is None or entry.done or entry.owner != owner or entry.deadline == 0:
        return False, entry  # (deadline 0: released already; its attempt was given back then)
    if entry.deadline <= now and delivered:
        return False, entry  # expired: nothing left to release
    # An undelivered claim gives its attempt back even when its lease ran out while the record
    # waited: nobody else has claimed the key since (the owner is still ours).
    entry.deadline = 0
    if not delivered:
        entry.attempt = max(entry.attempt - 1, 0)  # the next claim starts this attempt again
    elif failed:
        entry.failures += 1
    return True, entry
