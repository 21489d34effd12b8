"""The dedup store protocol: claims with leases, done marks with retention, publish results.

Each idempotency key is in one of three states:

* absent;
* claimed (owner, lease deadline, attempt): a sidecar is delivering it;
* done (until its retention deadline): its effect happened; never deliver it again.

Every operation takes a batch of keys and costs one round trip. Implementations: memory (tests and
demos), SQLite (durable, single instance) and Redis (shared between replicas). All three pass the
same contract suite in tests/unit/test_store_contract.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, runtime_checkable


class ClaimStatus(IntEnum):
    NEW = 0  # now claimed by the caller: deliver it
    DONE = 1  # already processed: settle without delivering
    BUSY = 2  # another owner holds a live lease: hold it back and claim again later


class ClaimMode(IntEnum):
    """What a claim of a key its caller may already hold means for the key's attempt count."""

    #: A first claim, or a claim again after our own claim was released or expired (a nacked
    #: record whose delay ran out): taking over an expired or released claim is the next attempt.
    CLAIM = 0
    #: The caller has not delivered the record since its own last claim (it waited in a queue past
    #: its lease): if nobody else claimed the key meanwhile, the attempt stays the same.
    RENEW = 1
    #: The caller delivers the record again under its own live claim (ack deadline passed, or the
    #: app's stream closed): the next attempt, counted in the store, so a sidecar that takes the
    #: key over later counts on from there instead of repeating a number the app has seen. It is
    #: also a failed delivery (see Claim.failures), unless another owner took the key meanwhile.
    REDELIVER = 2


@dataclass(frozen=True, slots=True)
class Claim:
    status: ClaimStatus
    # Delivery attempt this claim starts (NEW), or the last attempt seen (DONE/BUSY). It grows when
    # a key is claimed again after a lease expired or was released, so a redelivery across sidecar
    # restarts still shows attempt > 1.
    attempt: int
    # Deliveries of the key that failed: the app nacked it, its ack deadline passed, or its
    # stream closed (REDELIVER, or a release with ``failed``). ``delivery.max_attempts`` bounds
    # this count, not ``attempt``: a claim handed back because a partition moved or a sidecar
    # died is a delivery attempt the app may have seen, but not a failure of the record.
    failures: int = 0


@dataclass(frozen=True, slots=True)
class PublishRecord:
    """The outcome of an idempotent Publish, kept under its idempotency key."""

    digest: str
    topic: str
    partition: int
    offset: int

    def encode(self) -> str:
        return f"{self.digest}|{self.topic}|{self.partition}|{self.offset}"

    @classmethod
    def decode(cls, raw: str) -> PublishRecord:
        digest, topic, partition, offset = raw.rsplit("|", 3)
        return cls(digest, topic, int(partition), int(offset))


#: complete(): the owner held a live claim (or the key was done already).
IN_TIME = 0
#: complete(): late (the owner's claim had lapsed or was taken), and nobody else holds a live claim.
LATE = -1


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the store holds for a key, for operators (``dedup-sidecar key``)."""

    state: str  # "absent", "claimed" (a live lease), "released" (lease ended or given back), "done"
    owner: str = ""
    lease_until_ms: int = 0  # epoch ms; meaningful when claimed
    expires_ms: int = 0  # epoch ms when the entry is forgotten
    attempt: int = 0
    published: PublishRecord | None = None  # its Publish result, if it was published
    failures: int = 0


@runtime_checkable
class DedupStore(Protocol):
    """Batched claim/complete/release over idempotency keys. See the module docstring."""

    name: str
    #: True when the state is shared between sidecar processes (only Redis).
    shared: bool

    async def claim(
        self, keys: Sequence[str], owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM
    ) -> list[Claim]:
        """Claim each key for ``owner`` for ``lease_ms``. Re-claiming your own key extends it.

        Taking over an expired or released claim starts the next attempt. ``mode`` says what the
        caller did with the record since its own last claim (see ClaimMode).
        """
        ...

    async def complete(self, keys: Sequence[str], owner: str, retention_ms: int) -> list[int]:
        """Mark keys done for ``retention_ms``. Idempotent.

        Returns, per key, IN_TIME (0) when ``owner`` held a live claim or the key was done already.
        Otherwise the complete was *late* (the lease expired or was taken) and the key is marked
        done anyway, because the effect happened. A late complete returns LATE (-1) when no other
        owner holds a live claim, or else the milliseconds that claim still runs: its owner may have
        claimed the key just before this complete and still deliver it until then (it checks the
        store again only when it renews). Whoever promises "not delivered again" waits that long.
        """
        ...

    async def release(
        self, keys: Sequence[str], owner: str, delivered: bool = True, failed: bool = False
    ) -> list[bool]:
        """Drop the claim of each key only if ``owner`` still holds it. Returns per key whether it did.

        ``delivered=False``: no app was sent the record under this claim (it was claimed ahead and
        then its partition moved, or the sidecar stopped). The attempt the claim started is given
        back, so the next owner's delivery carries the same attempt number instead of one more;
        this applies even if the lease ran out meanwhile, as long as nobody else claimed the key.
        ``failed=True``: the delivery failed (the app nacked it): the key's failures grow by one.
        """
        ...

    async def publish_begin(
        self, keys: Sequence[str], owner: str, lease_ms: int
    ) -> list[PublishRecord | Claim]:
        """Start an idempotent publish of each key, in one step per key.

        Returns the key's live publish record if it has one (published already: do not produce);
        otherwise claims the key's publish for ``owner`` for ``lease_ms`` and returns the Claim:
        NEW (produce it, then ``publish_finish``) or BUSY (another publisher holds it: try later);
        a publish claim's attempt number means nothing.
        Looking the record up and claiming are one atomic step, so a publisher that records and
        releases between them cannot make the caller produce the record a second time.
        """
        ...

    async def publish_finish(
        self, entries: Sequence[tuple[str, PublishRecord | None]], owner: str, retention_ms: int
    ) -> list[PublishRecord | None]:
        """End the publishes ``owner`` began: store each record, then drop the key's claim.

        A record is kept for ``retention_ms`` unless the key has one already (first writer wins,
        also between entries of one batch); the stored record is returned per entry. An entry
        with no record (the produce failed) only drops the claim, and gets the key's live
        record back if some other publisher stored one, else None.
        """
        ...

    async def purge(self) -> int:
        """Delete expired claims and done marks past retention. Returns how many were removed."""
        ...

    async def inspect(self, key: str, publish_key: str) -> KeyInfo:
        """Read, without changing anything, the delivery state of ``key`` (a store key) and the
        Publish result recorded under ``publish_key`` (an idempotency key)."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached."""
        ...

    async def close(self) -> None: ...


Clock = Callable[[], int]


def publish_claim_key(key: str) -> str:
    """The claim key under which a publish of idempotency key ``key`` is serialised.

    Publish claims share the claim keyspace with deliveries; the prefix keeps them apart.
    """
    return "pub:" + key


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000
