"""How the sidecar's Kafka clients connect: the librdkafka properties every client shares (the
brokers, TLS and SASL from the ``kafka.*`` settings), and a start-up check of the credentials.

A wrong password must stop the start with a message that names the setting. librdkafka treats
it like an unreachable broker (it retries forever and a metadata request times out with a
transport error); only its error callback says why, so the check listens there.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient

from sidecar.config import KafkaSettings
from sidecar.errors import ConfigError

log = logging.getLogger(__name__)


class _NotTwice(logging.Filter):
    """Drop librdkafka's FAIL lines (a connection failed): the error callback reports the same
    failure, and the clients count it there (sidecar/observability/outage.py) instead of logging each."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.args, tuple) and record.args and record.args[0] == "FAIL")


#: The logger librdkafka's own lines go to, for every client of the sidecar.
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
LIBRDKAFKA_LOG.addFilter(_NotTwice())


def _readable(path: Path, setting: str) -> Path:
    try:
        with open(path, "rb") as f:
            if not f.read(1):
                raise ConfigError(f"{setting}={path} is empty")
    except OSError as exc:
        raise ConfigError(f"{setting}={path} cannot be read: {exc.strerror}") from exc
    return path


def sasl_password(k: KafkaSettings) -> str | None:
    if k.sasl_password is not None:
        return k.sasl_password.get_secret_value()
    if k.sasl_password_file is not None:
        text = _readable(k.sasl_password_file, "kafka.sasl_password_file").read_text().rstrip("\r\n")
        if not text:
            raise ConfigError(f"kafka.sasl_password_file={k.sasl_password_file} holds no password")
        return text
    return None


def client_config(k: KafkaSettings) -> dict[str, Any]:
    """The properties every Kafka client of the sidecar starts from. Raises ConfigError for a
    file setting that cannot be read, naming it."""
    conf: dict[str, Any] = {"bootstrap.servers": k.bootstrap_servers, "client.id": "dedup-sidecar"}
    if k.security_protocol != "PLAINTEXT":
        conf["security.protocol"] = k.security_protocol
    if k.sasl_mechanism:
        conf["sasl.mechanisms"] = k.sasl_mechanism
    if k.sasl_username:
        conf["sasl.username"] = k.sasl_username
    password = sasl_password(k)
    if password is not None:
        conf["sasl.password"] = password
    for setting, prop in (
        ("ssl_ca_file", "ssl.ca.location"),
        ("ssl_cert_file", "ssl.certificate.location"),
        ("ssl_key_file", "ssl.key.location"),
    ):
        path = getattr(k, setting)
        if path is not None:
            conf[prop] = str(_readable(path, f"kafka.{setting}"))
    return conf


def security_only(conf: dict[str, Any]) -> dict[str, Any]:
    """The brokers and the security properties of a client's ``conf`` (for an admin client)."""
    keep = ("bootstrap.servers", "client.id", "security.", "sasl.", "ssl.")
    return {k: v for k, v in conf.items() if k.startswith(keep)}


def secured(conf: dict[str, Any]) -> bool:
    return str(conf.get("security.protocol", "plaintext")).lower() != "plaintext"


def check_credentials(conf: dict[str, Any], timeout_s: float = 15.0) -> None:
    """Ask the cluster for metadata with ``conf``. Raises ConfigError, naming the settings, when
    the brokers refuse the credentials or the TLS handshake; an unreachable cluster is only
    logged (the sidecar starts, and readiness says NOT_SERVING until the brokers answer)."""
    errors: list[KafkaError] = []
    admin = AdminClient({**conf, "error_cb": errors.append})  # type: ignore[dict-item]
    failure: object = None
    deadline = time.monotonic() + timeout_s
    refused = (KafkaError._AUTHENTICATION, KafkaError._SSL)
    while time.monotonic() < deadline and not any(e.code() in refused for e in errors):
        try:
            admin.list_topics(timeout=1)
            return
        except Exception as exc:  # noqa: BLE001 - the error callback says why
            failure = exc
        finally:
            admin.poll(0)
    codes = {e.code() for e in errors}
    if KafkaError._AUTHENTICATION in codes:
        why = next(e.str() for e in errors if e.code() == KafkaError._AUTHENTICATION)
        raise ConfigError(
            f"the Kafka brokers refused the sidecar's credentials ({why}): check kafka.sasl_username and "
            "kafka.sasl_password (or kafka.sasl_password_file), and kafka.sasl_mechanism"
        )
    if KafkaError._SSL in codes:
        why = next(e.str() for e in errors if e.code() == KafkaError._SSL)
        raise ConfigError(
            f"the TLS handshake with the Kafka brokers failed ({why}): check kafka.ssl_ca_file (the CA "
            "that signed the brokers' certificates) and kafka.bootstrap_servers"
        )
    log.warning("cannot reach the Kafka brokers to check the credentials yet: %s", failure)
