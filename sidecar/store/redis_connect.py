"""How the Redis store connects: the URL's shapes (one node, Sentinels, Cluster seeds), TLS and
credentials, the ACL the store's user needs, and what is said when Redis refuses or is gone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    NoPermissionError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.errors import ConfigError, StoreUnavailable

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")

#: Every command the store sends, its scripts' included (ACLs apply inside scripts too). CONFIG
#: GET and INFO are read at start-up only; without CONFIG GET the durability check is skipped.
ACL_COMMANDS = (
    "ping", "info", "config|get", "evalsha", "script|load", "wait",
    "cluster|slots", "cluster|shards", "cluster|nodes", "asking", "readonly",
    "time", "get", "set", "del", "pttl", "pexpire",
)  # fmt: skip


def acl_setuser(user: str, password: str, key_pattern: str) -> list[str]:
    """The ``ACL SETUSER`` command (as words) for a user that may do exactly what the store needs."""
    return ["ACL", "SETUSER", user, "reset", "on", f">{password}", f"~{key_pattern}", "resetchannels",
            "-@all", *(f"+{c}" for c in ACL_COMMANDS)]  # fmt: skip


def describe(exc: BaseException) -> str:
    """What went wrong, in words an operator can act on (never the URL: it may hold a password)."""
    if isinstance(exc, StoreUnavailable):
        return str(exc)
    if isinstance(exc, NoPermissionError):
        return (
            f"Redis refused a command to the store's user: {exc} (the ACL user in store.redis_url "
            "needs the commands listed in docs/OPERATIONS.md)"
        )
    if isinstance(exc, MasterNotFoundError):
        return _no_master(str(exc))
    if isinstance(exc, AuthenticationError):
        return f"Redis refused the credentials: {exc} (user and password in store.redis_url)"
    if isinstance(exc, ReadOnlyError):
        return (
            "Redis answered READONLY: store.redis_url points at a replica; point it at the primary, "
            "or use redis+sentinel:// to follow the primary"
        )
    if isinstance(exc, ClusterDownError):
        return f"Redis Cluster is down ({exc}): a failover may be in progress"
    if isinstance(exc, TryAgainError):
        return f"Redis Cluster is moving a slot ({exc}); the call is retried"
    if isinstance(exc, RedisTimeoutError | TimeoutError):
        return f"Redis did not answer in time: {exc}"
    if isinstance(exc, RedisConnectionError | OSError):
        return f"Redis unreachable: {exc}"
    return f"Redis error: {type(exc).__name__}: {exc}"


def _no_master(text: str) -> str:
    """redis-py's MasterNotFoundError lists each Sentinel's client and its failure: say what to
    change instead."""
    name = re.search(r"No master found for '([^']*)'", text)
    head = f"no Sentinel named a primary for {name.group(1) if name else '?'!r}"
    if "AuthenticationError" in text:
        return (
            f"{head}: the Sentinels refused the credentials (store.redis_sentinel_password and "
            "store.redis_sentinel_username; the credentials in store.redis_url are the data nodes')"
        )
    if "SSL" in text or "ssl" in text.split(" - ", 1)[-1]:
        return f"{head}: TLS to the Sentinels failed (store.redis_sentinel_tls, store.redis_tls_ca_file)"
    if "Error" in text.split(" - ", 1)[-1]:
        failures = sorted(set(re.findall(r" - ([A-Za-z:]*Error)", text)))
        return (
            f"{head}: the Sentinels failed with {', '.join(failures)} (their host:port list in "
            "store.redis_url; store.redis_sentinel_tls if they speak TLS)"
        )
    return f"{head}: check the master name at the end of store.redis_url"


def unavailable(exc: BaseException, where: str = "") -> StoreUnavailable:
    return StoreUnavailable(f"dedup store: {describe(exc)}{where} (setting: store.redis_url)")


def connection_kwargs(
    url: str, timeout_s: float, ca_file: str | None, cert_file: str | None, key_file: str | None
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "decode_responses": True,
    }
    tls = urlsplit(url).scheme in ("rediss", "rediss+sentinel")
    files = {"ssl_ca_certs": ca_file, "ssl_certfile": cert_file, "ssl_keyfile": key_file}
    given = {k: v for k, v in files.items() if v}
    if given and not tls:
        raise ConfigError(
            "store.redis_tls_* files are set but store.redis_url does not start with rediss:// "
            "(or rediss+sentinel://): TLS is chosen by the URL"
        )
    if tls:
        kwargs.update(given)
    return kwargs


@dataclass(frozen=True)
class SentinelAuth:
    """How the Sentinels themselves are reached: their own credentials (Sentinel's
    ``requirepass`` or ACL user, not the data nodes'), and whether they speak TLS (None: as the
    URL says for the data nodes, ``rediss+sentinel://``)."""

    username: str | None = None
    password: str | None = None
    tls: bool | None = None


#: Sentinels asked without credentials, over TLS when the URL says so for the data nodes.
NO_SENTINEL_AUTH = SentinelAuth()


def sentinel_client(
    url: str, kwargs: dict[str, Any], auth: SentinelAuth = NO_SENTINEL_AUTH
) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
    """A client of the primary named in ``redis+sentinel://[user:password@]host:port[,host:port...]
    /<master name>[/<db>]``, and the clients of the Sentinels (to close with it). The URL's
    credentials are the data nodes'; the Sentinels' own are in ``auth``."""
    parts = urlsplit(url)
    hosts = _hosts(parts.netloc, "a redis+sentinel:// URL lists the Sentinels as host:port[,host:port...]")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(
            "store.redis_url: a redis+sentinel:// URL ends with /<master name>[/<db>], "
            "e.g. redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster/0"
        )
    tls = parts.scheme == "rediss+sentinel"
    node_kwargs = _with_credentials(kwargs, parts, tls)
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    if auth.username:
        sentinel_kwargs["username"] = auth.username
    if auth.password:
        sentinel_kwargs["password"] = auth.password
    if auth.tls if auth.tls is not None else tls:
        sentinel_kwargs["ssl"] = True
        sentinel_kwargs.update({k: v for k, v in kwargs.items() if k.startswith("ssl_")})
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client: aioredis.Redis = sentinel.master_for(
        path[0], redis_class=aioredis.Redis, db=int(path[1]) if len(path) == 2 else 0, **node_kwargs
    )
    return client, list(sentinel.sentinels)


def _with_credentials(kwargs: dict[str, Any], parts: SplitResult, tls: bool) -> dict[str, Any]:
    """``kwargs`` with the data nodes' user and password from the URL, and TLS when it says so."""
    out = dict(kwargs)
    if parts.username:
        out["username"] = unquote(parts.username)
    if parts.password:
        out["password"] = unquote(parts.password)
    if tls:
        out["ssl"] = True
    return out


def _hosts(netloc: str, usage: str) -> list[tuple[str, int]]:
    """The host:port[,host:port...] list of a URL's network location (after any credentials)."""
    hosts: list[tuple[str, int]] = []
    for item in netloc.rpartition("@")[2].split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"store.redis_url: {usage}")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def cluster_seeds(url: str) -> list[tuple[str, int]]:
    """The start-up nodes of ``redis[s]://[user:password@]host:port,host:port[,...]`` (a Redis
    Cluster given by several seeds: any that answers will do); [] for a URL of one node."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or "," not in parts.netloc:
        return []
    path = [p for p in parts.path.split("/") if p]
    if path not in ([], ["0"]):
        raise ConfigError(
            "store.redis_url: a URL with several nodes names a Redis Cluster, which has database 0 only: "
            "end it with /0 or nothing"
        )
    return _hosts(parts.netloc, "several nodes are listed as host:port,host:port[,...]")


def cluster_client(url: str, seeds: list[tuple[str, int]], kwargs: dict[str, Any]) -> RedisCluster:
    """A Redis Cluster client that starts from whichever of ``seeds`` answers first."""
    parts = urlsplit(url)
    extra = _with_credentials(kwargs, parts, parts.scheme == "rediss")
    nodes = [ClusterNode(host, port) for host, port in seeds]
    return RedisCluster(startup_nodes=nodes, **extra)
