"""Open the configured dedup store."""

from __future__ import annotations

import logging

from sidecar.config import Settings
from sidecar.store.base import DedupStore
from sidecar.store.memory import MemoryStore
from sidecar.store.redis import RedisStore
from sidecar.store.redis_connect import SentinelAuth
from sidecar.store.sqlite import SQLiteStore

log = logging.getLogger(__name__)


async def open_store(settings: Settings) -> DedupStore:
    s = settings.store
    retention_ms = s.retention_seconds * 1000
    if s.backend == "memory":
        log.warning(
            "store.backend=memory: processed keys are forgotten on restart (for tests and demos only)"
        )
        return MemoryStore(retention_ms=retention_ms)
    if s.backend == "sqlite":
        return await SQLiteStore(s.sqlite_path, s.sqlite_synchronous, retention_ms=retention_ms).open()
    store = RedisStore(
        s.redis_url.get_secret_value(),
        s.key_prefix,
        retention_ms,
        min_replicas=s.redis_min_replicas_acked,
        wait_ms=s.redis_wait_timeout_ms,
        tls_ca_file=s.redis_tls_ca_file,
        tls_cert_file=s.redis_tls_cert_file,
        tls_key_file=s.redis_tls_key_file,
        cluster_batching=s.redis_cluster_batching,
        sentinel_auth=SentinelAuth(
            s.redis_sentinel_username,
            s.redis_sentinel_password.get_secret_value() if s.redis_sentinel_password else None,
            s.redis_sentinel_tls,
        ),
    )
    try:
        await store.ping()
        await store.check_durability(s.require_durable_store)
        log.info("Redis dedup store: %s", store.shape)
    except BaseException:
        await store.close()
        raise
    return store
