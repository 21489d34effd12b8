"""What a store error says: each Redis failure in words that name what happened and the setting."""

from __future__ import annotations

import pytest
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    NoPermissionError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.store.redis_connect import acl_setuser, unavailable
from sidecar.store.redis_shapes import ReplicaShortfall, check_wait


@pytest.mark.parametrize(
    ("exc", "says"),
    [
        (ClusterDownError("The cluster is down"), "a failover may be in progress"),
        (TryAgainError("Multiple keys request during rehashing of slot"), "moving a slot"),
        (ReadOnlyError("You can't write against a read only replica."), "points at a replica"),
        (NoPermissionError("this user has no permissions to run the 'evalsha' command"), "ACL user"),
        (AuthenticationError("invalid username-password pair"), "refused the credentials"),
        (RedisTimeoutError("Timeout reading from socket"), "did not answer in time"),
        (RedisConnectionError("Error 111 connecting to 10.0.0.1:6379"), "unreachable"),
    ],
)
def test_each_failure_says_what_happened_and_names_the_setting(exc: Exception, says: str) -> None:
    message = str(unavailable(exc))
    assert says in message
    assert "store.redis_url" in message


def test_a_replica_shortfall_names_both_settings() -> None:
    check_wait(2, 2, 500, "127.0.0.1:7000")  # enough: no error
    with pytest.raises(
        ReplicaShortfall, match=r"1 of the 2 replicas.*store\.redis_min_replicas_acked"
    ) as info:
        check_wait(1, 2, 500, "127.0.0.1:7000")
    assert "store.redis_wait_timeout_ms" in str(info.value)


def test_the_acl_line_grants_only_the_store_commands_on_its_prefix() -> None:
    words = acl_setuser("dedup", "pw", "dedup:*")
    assert words[:4] == ["ACL", "SETUSER", "dedup", "reset"]
    assert "~dedup:*" in words
    assert "-@all" in words
    assert words.index("-@all") < words.index("+evalsha")  # everything off, then the list on
    assert not any(w in words for w in ("+@all", "+flushall", "+keys", "+eval"))


@pytest.mark.parametrize(
    ("error", "refuses"),
    [
        # Redis 6 reading a shebang line; Redis 7 given a flag it does not know; a proxy.
        ("ERR Error compiling script (new function): user_script:1: unexpected symbol near '#'", True),
        ("ERR Unexpected flag in script shebang: allow-cross-slot-keys", True),
        ("CROSSSLOT Keys in request don't hash to the same slot", True),
        # A key out of place while a slot moves, a failover, a stale map: only that call falls back.
        ("ERR Script attempted to access a non local key in a cluster node script: abc", False),
        ("READONLY You can't write against a read only replica.", False),
        ("CLUSTERDOWN The cluster is down", False),
        ("TRYAGAIN Multiple keys request during rehashing of slot", False),
        ("OOM command not allowed when used memory > 'maxmemory'.", False),
    ],
)
def test_only_a_server_that_refuses_packed_scripts_turns_them_off(error: str, refuses: bool) -> None:
    from sidecar.store.redis_shapes import _REFUSES_PACKED

    assert bool(_REFUSES_PACKED.search(error)) is refuses
