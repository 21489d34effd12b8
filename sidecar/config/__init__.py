"""Typed settings: one object, loaded from defaults < a TOML file < environment < flags.

Environment variables use the ``DEDUP_`` prefix and ``__`` between section and field, e.g.
``DEDUP_KAFKA__BOOTSTRAP_SERVERS=broker:9092``. The file is named by ``--config`` or
``DEDUP_CONFIG``; deploy/sidecar.example.toml documents every setting.

- ``settings``: the schema, a pydantic model per section, and ``Settings`` with its sources.
- ``loading``: ``load`` and the checks around it (unknown keys and variables), the redacted dump.
- ``listen``: listen addresses (HOST:PORT or a Unix socket).

A foundation: every package may import it, and it imports nothing of the sidecar but ``errors``.
"""

from sidecar.config.listen import is_loopback_listen, is_unix_listen, split_listen, unix_socket_path
from sidecar.config.loading import (
    REDACTED,
    check_environment,
    describe_errors,
    load,
    redacted,
    unknown_settings,
)
from sidecar.config.settings import (
    MAX_WORKERS,
    CommitSettings,
    CredentialSettings,
    DeliverySettings,
    KafkaSettings,
    PublishSettings,
    ServerSettings,
    Settings,
    StoreSettings,
    TracingSettings,
    valid_topic,
)

__all__ = [
    "MAX_WORKERS",
    "REDACTED",
    "CommitSettings",
    "CredentialSettings",
    "DeliverySettings",
    "KafkaSettings",
    "PublishSettings",
    "ServerSettings",
    "Settings",
    "StoreSettings",
    "TracingSettings",
    "check_environment",
    "describe_errors",
    "is_loopback_listen",
    "is_unix_listen",
    "load",
    "redacted",
    "split_listen",
    "unix_socket_path",
    "unknown_settings",
    "valid_topic",
]
