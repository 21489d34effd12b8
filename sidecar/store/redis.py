"""Redis dedup store: shared state for several sidecar replicas.

Each operation is a Lua script that treats every key on its own, and a batch is one pipeline:
one round trip per batch. On one node (or a Sentinel-watched primary) a script call carries up to
500 keys; on Redis Cluster (detected with ``INFO cluster`` on first use) a batch is one pipeline per
master, a call carrying a master's keys or one key (sidecar/store/redis_shapes.py); the scripts
are in sidecar/store/redis_scripts.py, the connection in sidecar/store/redis_connect.py. Times come
from the Redis server's clock (``TIME``), so replicas with skewed clocks agree on leases.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from sidecar.errors import ConfigError, StoreUnavailable
from sidecar.groupcommit import GroupCommit
from sidecar.store import rules
from sidecar.store.base import Claim, ClaimMode, ClaimStatus, KeyInfo, PublishRecord
from sidecar.store.redis_connect import (
    NO_SENTINEL_AUTH,
    SENTINEL_SCHEMES,
    SentinelAuth,
    cluster_client,
    cluster_seeds,
    connection_kwargs,
    sentinel_client,
    unavailable,
)
from sidecar.store.redis_scripts import CLAIM, COMPLETE, PUBLISH_BEGIN, PUBLISH_FINISH, RELEASE
from sidecar.store.redis_shapes import ClusterRouter, ReplicaShortfall, ReplicaWait, Script, Standalone, resp

log = logging.getLogger(__name__)


def _text(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


_CHUNK = 500  # keys per script call on a standalone Redis: bounds how long one call blocks it


# (status, attempt[, failures]) as replied -> Claim; Claims are immutable
_CLAIMS: dict[tuple[Any, ...], Claim] = {}


def _claim_of(reply: tuple[Any, ...]) -> Claim:
    """The Claim for a (status, attempt[, failures]) reply, cached: nearly every reply is
    (NEW, 1, 0). A publish claim's reply has no failures."""
    failures = int(reply[2]) if len(reply) > 2 else 0
    claim = Claim(ClaimStatus(int(reply[0])), int(reply[1]), failures)
    if len(_CLAIMS) < 10_000:
        _CLAIMS[reply] = claim
    return claim


class RedisStore:
    """Parameters:
    url: ``redis://`` or ``rediss://`` (one node, or any node of a Redis Cluster: detected), or
        ``redis+sentinel://host:port[,host:port...]/<master name>[/<db>]`` (a primary that
        Sentinels fail over; ``rediss+sentinel://`` for TLS), with credentials if needed.
    prefix: prefix of every key this store writes.
    min_replicas, wait_ms: answer only once ``min_replicas`` replicas hold each batch's writes
        (``WAIT``), waiting at most ``wait_ms``; 0 answers as soon as the master has them.
    tls_ca_file, tls_cert_file, tls_key_file: for ``rediss://``: the CA to trust and a client
        certificate, if the server asks for one.
    cluster_batching: on a Cluster, ``per-master`` (one script call carries a master's keys, on
        Redis 7 or newer) or ``per-key`` (one key per call: every call touches one slot).
    """

    name = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        prefix: str = "dedup",
        retention_ms: int = 7 * 86_400_000,
        timeout_s: float = 5.0,
        min_replicas: int = 0,
        wait_ms: int = 1000,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        cluster_batching: Literal["per-master", "per-key"] = "per-master",
        sentinel_auth: SentinelAuth = NO_SENTINEL_AUTH,
    ):
        self._kwargs = connection_kwargs(url, timeout_s, tls_ca_file, tls_cert_file, tls_key_file)
        sentinel = urlsplit(url).scheme in SENTINEL_SCHEMES
        if not sentinel and sentinel_auth != NO_SENTINEL_AUTH:
            raise ConfigError(
                "store.redis_sentinel_* settings are set but store.redis_url is not a "
                "redis+sentinel:// (or rediss+sentinel://) URL"
            )
        sentinels: list[aioredis.Redis] = []
        self._seeds = cluster_seeds(url)
        try:
            if sentinel:
                self._client, sentinels = sentinel_client(url, self._kwargs, sentinel_auth)
            elif self._seeds:
                # Several nodes: a Redis Cluster, started from whichever answers. The plain
                # client below is one seed's, for the shape's bookkeeping only.
                host, port = self._seeds[0]
                self._client = aioredis.Redis(host=host, port=port, **self._kwargs)
            else:
                self._client = aioredis.Redis.from_url(url, **self._kwargs)
        except ValueError as exc:
            raise ConfigError(f"store.redis_url is not a Redis URL: {exc}") from None
        self._url = url
        self._cluster_batching = cluster_batching
        self._timeout_s = timeout_s
        self._wait = ReplicaWait(min_replicas, wait_ms)
        self._prefix = prefix
        self._retention_ms = retention_ms
        self._claim = Script(CLAIM)
        self._complete = Script(COMPLETE)
        self._release = Script(RELEASE)
        self._publish_begin = Script(PUBLISH_BEGIN)
        self._publish_finish = Script(PUBLISH_FINISH)
        self._standalone = Standalone(self._client, timeout_s, self._wait, sentinels)
        self._router: ClusterRouter | None = None
        self._shape: str | None = "sentinel" if sentinel else None  # learnt on first use
        self._shape_lock = asyncio.Lock()
        # Group commit per operation and arguments: concurrent calls (unary Acks, Publishes,
        # intake batches) share a round trip; at most two round trips of one kind are in flight,
        # and what arrives meanwhile goes together in the next.
        self._joiners: dict[tuple[Any, ...], GroupCommit[Any, Any]] = {}
        self._closed = False

    @property
    def shape(self) -> str | None:
        """``standalone``, ``cluster`` or ``sentinel``; None until the first call."""
        return self._shape

    @property
    def per_master_calls(self) -> bool:
        """On a Cluster: True while a master's keys travel in one script call (see ClusterRouter)."""
        return self._router is not None and self._router.packed

    @property
    def round_trips(self) -> int:
        """Pipelines sent to Redis so far (on a Cluster, one per master a batch touches)."""
        return self._standalone.round_trips + (self._router.round_trips if self._router else 0)

    def _p(self, key: str) -> bytes:
        return f"{self._prefix}:p:{key}".encode()

    def _joined(
        self, what: tuple[Any, ...], run: Callable[[list[Any]], Awaitable[list[Any]]]
    ) -> GroupCommit[Any, Any]:
        joiner = self._joiners.get(what)
        if joiner is None:
            if len(self._joiners) > 1024:  # arguments that vary (lease lengths): forget idle ones
                for k in [k for k, j in self._joiners.items() if j.idle]:
                    del self._joiners[k]
            joiner = self._joiners[what] = GroupCommit(run, max_in_flight=2)
        return joiner

    async def _per_key(self, script: Script, keys: Sequence[str], args: list[Any], width: int) -> list[Any]:
        """Run ``script`` over ``keys`` (dedup keys); concurrent calls with the same script and
        arguments share one round trip. Returns one result per key (a tuple when ``width`` > 1)."""
        if not keys:
            return []
        shared = [str(a).encode() for a in args]

        async def run(full_keys: list[bytes]) -> list[Any]:
            return await self._eval(script, full_keys, shared, None, width)

        prefix = f"{self._prefix}:k:"
        return await self._joined((script.text, *args), run)([(prefix + k).encode() for k in keys])

    async def _eval(
        self, script: Script, keys: list[bytes], shared: list[bytes], per_key: list[bytes] | None, width: int
    ) -> list[Any]:
        """Run ``script`` over ``keys``: a chunk of keys per call on one node, a pipeline per
        master on Redis Cluster (ClusterRouter). ARGV is ``shared`` followed by the call's
        ``per_key`` values. Returns one result per key (a tuple when ``width`` > 1)."""
        try:
            # The shape is learnt once; after that no coroutine per batch to ask for it.
            router = self._router if self._shape is not None else await self._cluster_router()
            if router is not None:
                replies = await router.run(script, keys, shared, per_key)
            else:
                commands = []
                for i in range(0, len(keys), _CHUNK):
                    chunk = keys[i : i + _CHUNK]
                    tail = per_key[i : i + _CHUNK] if per_key is not None else []
                    count = b"%d" % len(chunk)
                    commands.append(resp([b"EVALSHA", script.sha, count, *chunk, *shared, *tail]))
                replies = await self._standalone.run(script, commands)
        except StoreUnavailable:
            raise
        except RedisError as exc:
            raise unavailable(exc) from exc
        flat = [x for reply in replies for x in reply]
        if width == 1:
            return flat
        return [tuple(flat[i : i + width]) for i in range(0, len(flat), width)]

    async def _cluster_router(self) -> ClusterRouter | None:
        """The Cluster router when the server is a Redis Cluster (asked once, with INFO; callers
        that come while it is being asked wait for that answer)."""
        async with self._shape_lock:
            if self._shape is not None:
                return self._router
            if self._seeds:
                client = cluster_client(self._url, self._seeds, self._kwargs)
                try:
                    await client.initialize()
                except Exception as exc:
                    await client.aclose()
                    seeds = ", ".join(f"{h}:{p}" for h, p in self._seeds)
                    raise StoreUnavailable(
                        f"Redis Cluster: none of the nodes in store.redis_url ({seeds}) answered: {exc}"
                    ) from exc
            elif (await self._client.info("cluster")).get("cluster_enabled"):
                client = RedisCluster.from_url(self._url, **self._kwargs)
            else:
                client = None
            if client is not None:
                per_master = self._cluster_batching == "per-master"
                self._router = ClusterRouter(client, self._timeout_s, self._wait, per_master)
                self._shape = "cluster"
                log.info(
                    "Redis dedup store: a Redis Cluster; batches are pipelined per master, %s",
                    "a master's keys in one call" if per_master else "one key per call",
                )
            else:
                self._shape = "standalone"
        return self._router

    async def claim(
        self, keys: Sequence[str], owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM
    ) -> list[Claim]:
        args = [owner, lease_ms, self._retention_ms, int(mode)]
        raw = await self._per_key(self._claim, keys, args, 3)
        known = _CLAIMS
        return [known.get(r) or _claim_of(r) for r in raw]

    async def complete(self, keys: Sequence[str], owner: str, retention_ms: int) -> list[int]:
        return [int(x) for x in await self._per_key(self._complete, keys, [owner, retention_ms], 1)]

    async def release(
        self, keys: Sequence[str], owner: str, delivered: bool = True, failed: bool = False
    ) -> list[bool]:
        args = [owner, int(delivered), int(failed)]
        return [bool(int(x)) for x in await self._per_key(self._release, keys, args, 1)]

    async def publish_begin(
        self, keys: Sequence[str], owner: str, lease_ms: int
    ) -> list[PublishRecord | Claim]:
        if not keys:
            return []
        shared = [owner.encode(), str(lease_ms).encode()]

        async def run(items: list[bytes]) -> list[Any]:
            return await self._eval(self._publish_begin, items, shared, None, 2)

        raw = await self._joined(("begin", owner, lease_ms), run)([self._p(key) for key in keys])
        known = _CLAIMS
        return [PublishRecord.decode(str(r[1])) if r[0] == 3 else known.get(r) or _claim_of(r) for r in raw]

    async def publish_finish(
        self, entries: Sequence[tuple[str, PublishRecord | None]], owner: str, retention_ms: int
    ) -> list[PublishRecord | None]:
        if not entries:
            return []
        shared = [owner.encode(), str(retention_ms).encode()]

        async def run(items: list[tuple[bytes, bytes]]) -> list[Any]:
            keys, values = [k for k, _ in items], [v for _, v in items]
            return await self._eval(self._publish_finish, keys, shared, values, 1)

        items = [(self._p(key), record.encode().encode() if record else b"") for key, record in entries]
        raw = await self._joined(("finish", owner, retention_ms), run)(items)
        return [
            record if r == 1 else PublishRecord.decode(str(r)) if r else None
            for (_, record), r in zip(entries, raw, strict=True)
        ]

    async def purge(self) -> int:
        return 0  # Redis expires keys itself (PEXPIRE on every write)

    async def ping(self) -> None:
        """Reach the server, learn its shape, and check that the store's scripts can run there."""
        try:
            if not self._seeds:  # one node, or the seed of a cluster (which must answer)
                await self._client.ping()
            await self._cluster_router()
            await self._per_key(self._release, ["~ping"], ["~ping", 1, 0], 1)  # writes nothing
        except ReplicaShortfall as exc:  # reachable and allowed: replicas lag, which may pass
            log.warning("at start-up: %s", exc)
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"at start-up: {exc}") from exc
        except RedisError as exc:
            raise unavailable(exc, " at start-up") from exc

    async def inspect(self, key: str, publish_key: str) -> KeyInfo:
        """GET the key's state and its publish record (two reads, on whichever node owns each)."""
        try:
            router = await self._cluster_router()
            client: Any = router.client if router is not None else self._client
            seconds, micros = await client.time()
            now = int(seconds) * 1000 + int(micros) // 1000
            raw = await client.get(f"{self._prefix}:k:{key}".encode())
            ttl = await client.pttl(f"{self._prefix}:k:{key}".encode())
            pub = await client.get(self._p(publish_key))
        except RedisError as exc:
            raise unavailable(exc, "") from exc
        published = None
        pub_text = _text(pub)
        if pub_text is not None and not pub_text.startswith("~"):  # "~owner|lease": in progress
            published = PublishRecord.decode(pub_text)
        state = _text(raw)
        if state is None:
            return rules.describe(None, now, published)
        done, rest = state.split("|", 1)
        owner, lease, counted = rest.rsplit("|", 2)
        attempt, _, failures = counted.partition(":")
        expires = now + ttl if ttl > 0 else 0
        entry = rules.Entry(
            done == "1", owner, int(lease), int(attempt), expires or now + 1, int(failures or 0)
        )
        return rules.describe(entry, now, published)

    async def _on_each_primary(self, *command: str) -> list[Any]:
        """Run a command on every node that holds data: the masters of a Cluster, else the primary."""
        router = await self._cluster_router()
        if router is None:
            return [await self._client.execute_command(*command)]  # type: ignore[no-untyped-call]
        nodes = await router.primaries()
        return [await router.client.execute_command(*command, target_nodes=node) for node in nodes]

    async def check_durability(self, require_durable: bool) -> bool:
        """Read Redis's persistence settings (on every master of a Cluster). Warn without AOF or
        RDB; refuse if durability is required. With ``min_replicas``, warn when a master has fewer
        replicas attached than that (every write would then wait and fail).

        Returns True when some persistence is on everywhere, False when off or not readable.
        """
        durable = True
        try:
            try:
                for aof, save in zip(
                    await self._on_each_primary("CONFIG", "GET", "appendonly"),
                    await self._on_each_primary("CONFIG", "GET", "save"),
                    strict=True,
                ):
                    persists = aof.get("appendonly") == "yes" or bool((save.get("save") or "").strip())
                    durable = durable and persists
            except ResponseError:
                log.warning(
                    "cannot read Redis persistence settings (CONFIG GET is disabled); "
                    "assuming they are durable"
                )
            if self._wait.replicas:
                for info in await self._on_each_primary("INFO", "replication"):
                    attached = int(info.get("connected_slaves", 0))
                    if attached < self._wait.replicas:
                        log.warning(
                            "a Redis primary has %d replica(s) attached but store.redis_min_replicas_acked "
                            "is %d: store calls fail until enough replicas attach",
                            attached,
                            self._wait.replicas,
                        )
        except RedisError as exc:
            raise unavailable(exc, " at start-up") from exc
        if durable:
            return True
        msg = (
            "Redis has neither AOF nor RDB persistence: a Redis restart forgets every processed key, and "
            "acked records may be delivered again. Enable it on the Redis server (appendonly yes, "
            "appendfsync everysec or always)"
        )
        if require_durable:
            raise ConfigError(msg + "; refusing to start because store.require_durable_store is set")
        log.warning("%s; set store.require_durable_store=true to refuse to start instead", msg)
        return False

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection. Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._router is not None:
            await self._router.close()
        await self._standalone.close()
