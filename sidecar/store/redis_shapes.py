"""How the Redis store reaches its server: one node, a Sentinel-watched primary, or a Cluster.

The store's scripts are the same in every shape; what differs is where a pipeline of script calls
goes. ``Standalone`` sends a batch down one pooled connection (a plain URL, or a Sentinel-managed
pool that asks the Sentinels where the primary is and follows a failover). ``ClusterRouter``
groups a batch's keys by the master that owns their slot and sends one pipeline per master, all
at once; it follows MOVED and ASK redirects and the slot moves of a failover itself, and retries
only the keys that did not run.

With ``min_replicas`` set, every pipeline ends with ``WAIT min_replicas timeout`` on the same
connection, so an answer is given only once that many replicas hold the batch's writes (Redis
replication is asynchronous: without it, a master that dies right after answering can take the
last writes with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.errors import StoreUnavailable
from sidecar.store.redis_connect import unavailable

log = logging.getLogger(__name__)


def resp(args: Sequence[bytes]) -> bytes:
    """One command in the Redis protocol (RESP): an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        parts += (b"$%d\r\n" % len(a), a, b"\r\n")
    return b"".join(parts)


#: Turns a script that walks KEYS into one that takes its keys in ARGV (``n, key1..keyn, args...``)
#: and may touch keys of any slot the node serves (Redis 7.0 script flags): one call then carries a
#: whole batch's keys for one Cluster master, as one call carries 500 keys on one node.
_PACKED_PROLOGUE = """#!lua flags=allow-cross-slot-keys
local n = tonumber(ARGV[1])
local K_, A_ = {}, {}
for i = 1, n do K_[i] = ARGV[i + 1] end
for i = n + 2, #ARGV do A_[#A_ + 1] = ARGV[i] end
"""


class Script:
    """A Lua script and its SHA1, computed here: the same on every node, loaded where missing.

    ``packed`` is the same script taking its keys in ARGV, for one call per Cluster master.
    """

    __slots__ = ("load", "packed", "sha", "text")

    def __init__(self, text: str, packable: bool = True) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest().encode()
        self.load = resp([b"SCRIPT", b"LOAD", text.encode()])
        self.packed: Script | None = None
        if packable:
            body = re.sub(r"\bKEYS\b", "K_", re.sub(r"\bARGV\b", "A_", text))
            self.packed = Script(_PACKED_PROLOGUE + body, packable=False)


class ReplicaShortfall(StoreUnavailable):
    """WAIT returned fewer replicas than store.redis_min_replicas_acked asks for."""


def check_wait(reply: Any, want: int, timeout_ms: int, node: str) -> None:
    got = int(reply)
    if got < want:
        raise ReplicaShortfall(
            f"dedup store: the write reached {got} of the {want} replicas that "
            f"store.redis_min_replicas_acked asks for within {timeout_ms} ms on Redis {node} "
            "(store.redis_wait_timeout_ms); the call is retried"
        )


class ReplicaWait:
    """``WAIT replicas timeout`` at the end of every pipeline (store.redis_min_replicas_acked), on
    the connection that carried the writes; nothing when ``replicas`` is 0."""

    __slots__ = ("command", "replicas", "seconds", "timeout_ms")

    def __init__(self, replicas: int, timeout_ms: int) -> None:
        self.replicas, self.timeout_ms = replicas, timeout_ms
        self.command = resp([b"WAIT", b"%d" % replicas, b"%d" % timeout_ms]) if replicas else b""
        self.seconds = timeout_ms / 1000 if replicas else 0.0  # added to a pipeline's time bound

    def check(self, reply: Any, node: str) -> None:
        check_wait(reply, self.replicas, self.timeout_ms, node)


class Standalone:
    """One node (or the primary a Sentinel names): a batch is one pipeline on one connection."""

    def __init__(
        self,
        client: aioredis.Redis,
        timeout_s: float,
        wait: ReplicaWait,
        sentinels: Sequence[aioredis.Redis] = (),
    ) -> None:
        self.client = client
        self._sentinels = list(sentinels)
        self.round_trips = 0  # pipelines sent, for capacity figures
        self._timeout_s = timeout_s
        self._wait = wait
        # redis-py's pool fails a caller at once (MaxConnectionsError, "Too many connections")
        # when all its connections are in use (100 unless the URL sets max_connections). A burst
        # of round trips (Acks and claims that come back together after a broker outage) must
        # wait its turn instead: a failed Ack is a redelivery. A few connections stay free for
        # the commands that do not come through here (PING, INFO).
        size = int(getattr(client.connection_pool, "max_connections", 100))
        self._slots = asyncio.Semaphore(max(1, size - min(4, size // 4)))

    async def run(self, script: Script, commands: list[bytes]) -> list[Any]:
        """Send ``commands`` (packed EVALSHA calls of ``script``) and return their replies."""
        for attempt in range(2):
            try:
                return await self._round_trip(b"".join(commands), len(commands))
            except NoScriptError:
                # Redis restarted, failed over or SCRIPT FLUSH: load it and run again, once.
                # Scripts are idempotent per key, so re-running those that did execute is harmless.
                if attempt:
                    raise
                await self._round_trip(script.load, 1, wait=False)
        raise AssertionError("unreachable")

    async def _round_trip(self, packed: bytes, replies: int, wait: bool = True) -> list[Any]:
        """Send pipelined commands on one pooled connection and read their replies.

        The hot path goes around redis-py's Pipeline (its per-call bookkeeping cost about as much
        CPU as the round trip itself) but keeps its connections: URL, auth, TLS, timeouts and,
        with Sentinel, finding the primary.
        """
        pool = self.client.connection_pool
        self.round_trips += 1
        waiting = wait and bool(self._wait.replicas)
        limit = self._timeout_s * 2 + (self._wait.seconds if waiting else 0)
        try:
            # A hard bound on the whole exchange, the wait for a slot and connecting included: a
            # store that hangs (a Redis restarting under us) must fail the call, so the caller
            # retries, never wait.
            async with asyncio.timeout(limit), self._slots:
                # The connection goes back to the pool before the slot is given up, so the next
                # caller in line always finds one.
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                try:
                    await conn.send_packed_command(
                        packed + self._wait.command if waiting else packed, check_health=False
                    )
                    out = [await conn.read_response() for _ in range(replies)]
                    if waiting:
                        self._wait.check(await conn.read_response(), conn.host)
                    return out
                except BaseException:
                    # Replies may be left unread (an error reply raises at once): never reuse it.
                    await conn.disconnect()
                    raise
                finally:
                    await pool.release(conn)
        except TimeoutError as exc:
            raise RedisTimeoutError(f"no answer from Redis within {limit:.0f}s") from exc

    async def close(self) -> None:
        await self.client.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()


#: The errors of a server that will not run packed scripts at all (no script flags, a proxy that
#: routes by declared keys). Any other error of a packed call (a key not on that node while slots
#: move, a failover, a replica answering READONLY) only sends that call's keys one by one.
_REFUSES_PACKED = re.compile(r"shebang|flag|compil|CROSSSLOT|unknown command", re.IGNORECASE)


class ClusterRouter:
    """Pipelines per Cluster master.

    On Redis 7.0 or newer (``packed``), a batch's keys that one master owns travel in one script
    call (up to 500 keys; the script's ``allow-cross-slot-keys`` flag lets it touch every slot the
    master serves): as few commands as on one node. Keys whose call failed (a slot moving, a
    failover) are sent again one key per call, which follows MOVED and ASK key by key. Older
    Redis gets one key per call from the start (a script may then touch one slot only).
    """

    #: Rounds of retries (with a topology refresh where needed) within one call's time budget.
    ROUNDS = 50
    CHUNK = 500

    def __init__(
        self, client: RedisCluster, timeout_s: float, wait: ReplicaWait, per_master: bool = True
    ) -> None:
        self.client = client
        self.round_trips = 0  # pipelines sent (one per master a batch touches), for capacity figures
        self._per_master = per_master  # store.redis_cluster_batching
        self.packed = False  # set once the servers are known to be Redis 7.0 or newer
        self._timeout_s = timeout_s
        self._wait = wait
        self._ready = False
        self._refreshing: asyncio.Task[None] | None = None

    async def _initialize(self) -> None:
        if not self._ready:
            await self.client.initialize()
            versions = [
                str((await self.client.info("server", target_nodes=node)).get("redis_version", "0"))
                for node in self.client.get_primaries()
            ]
            self.packed = self._per_master and all(int(v.split(".")[0]) >= 7 for v in versions)
            self._ready = True

    async def run(
        self, script: Script, keys: list[bytes], shared: list[bytes], per_key: list[bytes] | None
    ) -> list[list[Any]]:
        """Run ``script`` over ``keys`` (ARGV: ``shared``, then the key's ``per_key`` value) and
        return each key's reply, in order.

        MOVED refreshes the slot map and retries the key at its new owner; ASK sends it once to
        the importing node after ASKING; NOSCRIPT loads the script on that node; TRYAGAIN,
        CLUSTERDOWN and an unreachable master (a failover under way) are retried with the slot
        map read again, until the time budget is spent: then the error says what happened.
        """
        await self._initialize()
        nodes = self.client.nodes_manager
        results: list[Any] = [None] * len(keys)
        todo = list(range(len(keys)))
        single: set[int] = set() if self.packed else set(todo)  # keys sent one per call
        asking: dict[int, ClusterNode] = {}
        load_on: set[str] = set()
        deadline = time.monotonic() + self._timeout_s * 2
        last: BaseException | None = None
        for _ in range(self.ROUNDS):
            groups: dict[str, tuple[ClusterNode, list[int]]] = {}
            try:
                for i in todo:
                    node = asking.get(i) or nodes.get_node_from_slot(key_slot(keys[i]))
                    groups.setdefault(node.name, (node, []))[1].append(i)
            except RedisError as exc:  # a slot no live master covers: mid-failover
                last = exc
                groups = {}
            sent = list(groups.values())
            outcomes = await asyncio.gather(
                *(
                    self._send(node, script, keys, shared, per_key, idx, single, asking, load_on)
                    for node, idx in sent
                ),
                return_exceptions=True,
            )
            todo, refresh = [], not sent
            for (node, _), outcome in zip(sent, outcomes, strict=True):
                if isinstance(outcome, ReplicaShortfall):
                    raise outcome
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, RedisConnectionError | RedisTimeoutError | OSError):
                        raise unavailable(outcome, f" at Redis Cluster node {node.name}") from outcome
                    last, refresh = outcome, True  # the node is gone or hung: retry where its slots went
                    todo += groups[node.name][1]
                    continue
                load_on.discard(node.name)
                for idx, reply in outcome:
                    for i in idx:
                        asking.pop(i, None)
                    if not isinstance(reply, ResponseError):
                        if len(idx) == 1 and idx[0] in single:
                            results[idx[0]] = reply
                        else:  # a packed call: its keys' replies one after another
                            width = len(reply) // len(idx)
                            for j, i in enumerate(idx):
                                results[i] = reply[j * width : (j + 1) * width]
                        continue
                    todo += idx
                    if isinstance(reply, NoScriptError):
                        load_on.add(node.name)
                    elif len(idx) > 1 or idx[0] not in single:
                        single.update(idx)  # a packed call failed (a slot moving): key by key now
                        if _REFUSES_PACKED.search(str(reply)) and self.packed:
                            # Not a key in the wrong place: the server refuses the packed script
                            # itself (a proxy, a Redis without script flags). Stop trying it.
                            self.packed = False
                            log.warning(
                                "Redis Cluster refused a script call carrying several slots (%s); "
                                "sending one key per call from now on (store.redis_cluster_batching)",
                                reply,
                            )
                    elif isinstance(reply, MovedError):
                        refresh = True
                    elif isinstance(reply, AskError):
                        target = nodes.get_node(host=reply.host, port=reply.port)
                        if target is None:
                            refresh = True
                        else:
                            asking[idx[0]] = target
                    elif isinstance(reply, TryAgainError | ClusterDownError):
                        last = reply
                    else:
                        raise unavailable(reply, f" at Redis Cluster node {node.name}")
            if not todo:
                return results
            if time.monotonic() > deadline:
                break
            if refresh or last is not None:
                await asyncio.sleep(0.05 if not last else 0.2)
            if refresh:
                await self._refresh()
        raise unavailable(last or StoreUnavailable("slots kept moving"), " (Redis Cluster)")

    async def _refresh(self) -> None:
        """Read the slot map again; concurrent callers share one refresh."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self.client.nodes_manager.initialize())
        with contextlib.suppress(RedisError):  # no node answered yet: the next round tries again
            await asyncio.shield(self._refreshing)

    async def _send(
        self,
        node: ClusterNode,
        script: Script,
        keys: list[bytes],
        shared: list[bytes],
        per_key: list[bytes] | None,
        idx: list[int],
        single: set[int],
        asking: dict[int, ClusterNode],
        load_on: set[str],
    ) -> list[tuple[list[int], Any]]:
        """One pipeline to one node: [SCRIPT LOAD], packed calls of up to CHUNK keys, single-key
        calls (after ASKING when redirected), [WAIT]. Returns (key indices, reply) per call."""
        parts: list[bytes] = []
        calls: list[list[int] | None] = []  # per reply: the keys of a call, or None for a preamble
        packed_idx = [i for i in idx if i not in single]
        if node.name in load_on:
            parts.append(script.packed.load if packed_idx and script.packed else script.load)
            calls.append(None)
            if packed_idx and script.packed and len(packed_idx) < len(idx):
                parts.append(script.load)
                calls.append(None)
        if packed_idx:
            assert script.packed is not None
            for c in range(0, len(packed_idx), self.CHUNK):
                chunk = packed_idx[c : c + self.CHUNK]
                extra = [per_key[i] for i in chunk] if per_key is not None else []
                count = b"%d" % len(chunk)
                parts.append(
                    resp(
                        [
                            b"EVALSHA",
                            script.packed.sha,
                            b"0",
                            count,
                            *(keys[i] for i in chunk),
                            *shared,
                            *extra,
                        ]
                    )
                )
                calls.append(chunk)
        for i in idx:
            if i not in single:
                continue
            if i in asking:
                parts.append(b"*1\r\n$6\r\nASKING\r\n")
                calls.append(None)
            extra = [per_key[i]] if per_key is not None else []
            parts.append(resp([b"EVALSHA", script.sha, b"1", keys[i], *shared, *extra]))
            calls.append([i])
        conn = node.acquire_connection()
        self.round_trips += 1
        try:
            async with asyncio.timeout(self._timeout_s * 2 + self._wait.seconds):
                await conn.send_packed_command(b"".join(parts) + self._wait.command, check_health=False)
                out: list[tuple[list[int], Any]] = []
                for call in calls:
                    try:
                        reply = await conn.read_response()
                    except ResponseError as exc:  # the reply was read whole: the stream stays in step
                        reply = exc
                    if call is not None:
                        out.append((call, reply))
                if self._wait.replicas:
                    self._wait.check(await conn.read_response(), node.name)
                return out
        except BaseException as exc:
            await conn.disconnect()
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"no answer from Redis node {node.name} in time") from exc
            raise
        finally:
            node.release(conn)

    async def primaries(self) -> list[ClusterNode]:
        await self._initialize()
        return list(self.client.get_primaries())

    async def close(self) -> None:
        await self.client.aclose()
