"""The settings schema: one pydantic model per section, validated as a whole, and ``Settings``,
whose sources are defaults < a TOML file < environment < flags."""

from __future__ import annotations

import itertools
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from sidecar.config.listen import is_loopback_listen, is_unix_listen, split_listen, unix_socket_path
from sidecar.errors import ConfigError

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class _Section(BaseModel):
    """A settings section: a key it does not define is an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid")


def valid_topic(name: str) -> bool:
    return bool(_TOPIC_RE.match(name)) and name not in (".", "..")


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "dedup-sidecar"
    topics: list[str] = Field(default_factory=list)
    #: Extra librdkafka consumer properties (security, tuning). Ones the sidecar owns are refused.
    consumer: dict[str, str | int | float | bool] = Field(default_factory=dict)
    #: Extra librdkafka producer properties.
    producer: dict[str, str | int | float | bool] = Field(default_factory=dict)
    #: Records fetched per poll.
    fetch_batch: int = Field(500, ge=1, le=100_000)
    #: Least time between two hand-overs of a part-full batch to the event loop. A record that
    #: comes after a quiet spell of this length is handed over at once; records that come faster
    #: (a producer sending each record alone) wait up to this long to travel together, which
    #: cuts the sidecar's CPU per record. A batch of 64 records or more never waits. 0 hands every
    #: fetch over alone.
    handover_interval_ms: float = Field(2.0, ge=0, le=100)
    #: How long the group waits for a member that stopped heartbeating (kill -9, a lost host)
    #: before its partitions go to the others. With group_protocol = "consumer" the broker sets
    #: it (group.consumer.session.timeout.ms, 45 s by default) and this is not used.
    session_timeout_ms: int = Field(10_000, ge=1000)
    #: The consumer group protocol. "classic": the cooperative-sticky assignor, incremental
    #: rebalances, the session timeout above. "consumer": Kafka 4's protocol (KIP-848; brokers
    #: 4.0 and later), where the broker assigns partitions and each member reconciles on its own,
    #: with no group-wide barrier; its session timeout is the broker's. docs/ARCHITECTURE.md
    #: ("Rebalances") gives the measurements behind the default.
    group_protocol: Literal["classic", "consumer"] = "classic"
    #: "consumer": a consumer group; each partition has one reader, offsets are committed.
    #: "share": a share group (KIP-932, Kafka 4.2 and later; queue mode): every member reads
    #: every partition, the broker hands each record to one member under a time-limited lock
    #: and takes an accept, release or reject per record. No order; more members than
    #: partitions. docs/ARCHITECTURE.md ("Queue mode") gives the mapping.
    group_type: Literal["consumer", "share"] = "consumer"
    #: Share groups: where a new share group starts reading, applied to the group through the
    #: admin API at start-up (the group config share.auto.offset.reset). "earliest" reads what
    #: was written before the first member joined, as a new consumer group does here.
    share_auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    #: Share groups: records per poll (librdkafka's max.poll.records). The share consumer cannot
    #: poll again until every record of the last poll is accepted, released or rejected, so this
    #: bounds what a member holds at once; at least the apps' window keeps them busy. The broker
    #: lends whole producer batches, so a poll can bring more than this when producers batch.
    share_max_poll_records: int = Field(100, ge=1, le=10_000)
    #: How often librdkafka reports statistics, from which dedup_consumer_lag_records is read
    #: (so the lag is at most this old). 0 turns them, and the lag metric, off.
    statistics_interval_ms: int = Field(5000, ge=0)
    #: How every Kafka client of the sidecar (consumer, producer, admin) connects. These apply to
    #: all of them; kafka.consumer / kafka.producer can still override single properties.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    #: With SASL_*: the mechanism (others, e.g. OAUTHBEARER, through the pass-through maps).
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    #: The password, or a file holding it (a mounted secret; trailing newlines are ignored).
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    #: With SSL / SASL_SSL: the CA bundle that signed the brokers' certificates (default: the
    #: system's), and a client certificate and key for brokers that ask for one (mTLS).
    ssl_ca_file: Path | None = None
    ssl_cert_file: Path | None = None
    ssl_key_file: Path | None = None

    @model_validator(mode="after")
    def _security(self) -> KafkaSettings:
        sasl = self.security_protocol.startswith("SASL_")
        if self.sasl_password is not None and self.sasl_password_file is not None:
            raise ValueError("set kafka.sasl_password or kafka.sasl_password_file, not both")
        if sasl:
            has_password = self.sasl_password is not None or self.sasl_password_file is not None
            if self.sasl_mechanism is None or not self.sasl_username or not has_password:
                passed = {k.lower() for k in (*self.consumer, *self.producer)}
                if "sasl.mechanisms" not in passed and "sasl.mechanism" not in passed:
                    raise ValueError(
                        f"kafka.security_protocol={self.security_protocol} needs kafka.sasl_mechanism, "
                        "kafka.sasl_username and kafka.sasl_password (or kafka.sasl_password_file)"
                    )
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password or self.sasl_password_file:
            raise ValueError(
                "kafka.sasl_* settings are set but kafka.security_protocol="
                f"{self.security_protocol} does not use SASL: set it to SASL_SSL (or SASL_PLAINTEXT)"
            )
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        if not tls and (self.ssl_ca_file or self.ssl_cert_file or self.ssl_key_file):
            raise ValueError(
                "kafka.ssl_* files are set but kafka.security_protocol="
                f"{self.security_protocol} does not use TLS: set it to SSL or SASL_SSL"
            )
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            raise ValueError("kafka.ssl_cert_file and kafka.ssl_key_file go together: set both or neither")
        return self

    @field_validator("topics")
    @classmethod
    def _topics(cls, v: list[str]) -> list[str]:
        for t in v:
            if not valid_topic(t):
                raise ValueError(f"invalid topic name {t!r} in kafka.topics")
        return v


class StoreSettings(_Section):
    backend: Literal["memory", "sqlite", "redis"] = "sqlite"
    sqlite_path: Path = Path("./dedup-sidecar.sqlite3")
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    #: ``redis://`` or ``rediss://`` (one node, or any node of a Redis Cluster: detected at
    #: start-up; ``redis://host:port,host:port,...`` names several Cluster nodes, of which any
    #: that answers will do), or ``redis+sentinel://host:port[,host:port...]/<master name>[/<db>]``
    #: (``rediss+sentinel://`` for TLS). Credentials in the URL are the data nodes'.
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    #: The Sentinels' own credentials (their ``requirepass``, or an ACL user), if they ask.
    redis_sentinel_username: str | None = None
    redis_sentinel_password: SecretStr | None = None
    #: TLS to the Sentinels; unset: as the URL says for the data nodes (rediss+sentinel://). The
    #: CA and client certificate are the store.redis_tls_* files.
    redis_sentinel_tls: bool | None = None
    #: Answer an Ack, record a Publish and take a claim only once this many replicas hold the
    #: write (Redis WAIT): closes the window in which a failover loses the last writes. 0: off.
    redis_min_replicas_acked: int = Field(0, ge=0)
    #: How long a write may wait for those replicas before the call fails (and is retried).
    redis_wait_timeout_ms: int = Field(1000, ge=1)
    #: On a Redis Cluster: ``per-master`` sends a master's share of a batch as one script call
    #: (Redis 7+, cross-slot script flag); ``per-key`` sends one key per call (each call touches
    #: one slot). Both are one pipeline per master.
    redis_cluster_batching: Literal["per-master", "per-key"] = "per-master"
    #: For rediss:// URLs: the CA to trust (default: the system's), and a client certificate.
    redis_tls_ca_file: str | None = None
    redis_tls_cert_file: str | None = None
    redis_tls_key_file: str | None = None
    key_prefix: str = "dedup"
    #: How long a processed key is remembered (the dedup window).
    retention_seconds: int = Field(7 * 86_400, ge=1)
    #: Refuse to start on a Redis without AOF or RDB persistence.
    require_durable_store: bool = False
    purge_interval_seconds: float = Field(300, gt=0)


class DeliverySettings(_Section):
    idempotency_header: str = "idempotency-key"
    #: What identifies a record without the header: its coordinates, a hash of key and value, or
    #: nothing (the record goes to the dead-letter topic).
    key_fallback: Literal["offset", "hash", "dead-letter"] = "offset"
    ack_deadline_seconds: float = Field(30, gt=0)
    max_ack_deadline_seconds: int = Field(600, ge=1)
    #: Extra lease beyond the ack deadline, so a slow ack does not race a takeover.
    lease_margin_seconds: float = Field(5, ge=0)
    #: When a rebalance takes partitions away, how long the sidecar waits (sending nothing more
    #: of them) for the app to answer what it holds of them before it lets them go: answered,
    #: they are committed here and not delivered again by the next owner. The consumer fetches
    #: nothing meanwhile, and under group_protocol = "classic" the group's rebalance waits too.
    revoke_grace_seconds: float = Field(5, ge=0, le=30)
    max_attempts: int = Field(5, ge=1)
    backoff_initial_seconds: float = Field(1, ge=0)
    backoff_max_seconds: float = Field(60, ge=0)
    #: Dead-letter topic; ``{topic}`` is replaced by the source topic.
    dead_letter_topic: str = "{topic}.dlq"
    #: Pause a partition past this many unsettled records; resume at ``resume_unsettled``. A
    #: pause drops what librdkafka prefetched for the partition, so this is a bound for a
    #: partition that falls far behind, set above the depth of a busy pipeline.
    max_unsettled_per_partition: int = Field(25_000, ge=1)
    resume_unsettled: int = Field(15_000, ge=0)
    #: Records held unsettled across all partitions before intake waits (fetching then stops
    #: without a pause): bounds the sidecar's memory whatever the partition count.
    max_unsettled: int = Field(50_000, ge=1)
    #: Retry interval for records whose key another sidecar is delivering (BUSY).
    busy_retry_seconds: float = Field(1.0, gt=0)
    #: Leave the group after this long with no app stream attached, so partitions move elsewhere.
    detach_grace_seconds: float = Field(30, gt=0)
    default_max_in_flight: int = Field(1000, ge=1)
    default_max_batch: int = Field(500, ge=1)
    #: ``unordered``: every record may be in flight at once. ``key``: a record waits while an
    #: earlier record of its partition with the same Kafka key is unsettled (records without a
    #: key are not ordered). ``partition``: one unsettled record per partition at a time. A
    #: Subscribe may ask for a narrower ordering for its topics, never a wider one.
    ordering: Literal["unordered", "key", "partition"] = "unordered"
    #: Retry topics for long Nack delays: a delay of at least the first tier's seconds is not
    #: held in memory but written to the retry topic of the largest tier not above it, and the
    #: source offset settles. Strictly increasing seconds, e.g. [60, 600, 3600]. Empty: every
    #: delay is held in memory. Only for ``ordering = "unordered"``.
    retry_tiers_seconds: list[float] = Field(default_factory=list)
    #: Retry topic name; ``{topic}`` is the source topic and ``{tier}`` the tier's index.
    retry_topic: str = "{topic}.retry.{tier}"
    #: Create missing retry topics at start-up, with the source topic's partition count and
    #: replication factor. Off: a missing retry topic stops the start with its name.
    retry_create_topics: bool = True

    @field_validator("retry_tiers_seconds")
    @classmethod
    def _tiers(cls, v: list[float]) -> list[float]:
        if any(t <= 0 for t in v) or any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError(
                f"delivery.retry_tiers_seconds must be positive and strictly increasing, got {v}"
            )
        return v

    @field_validator("retry_topic")
    @classmethod
    def _retry_topic(cls, v: str) -> str:
        if "{topic}" not in v or "{tier}" not in v:
            raise ValueError(f"delivery.retry_topic must contain {{topic}} and {{tier}}, got {v!r}")
        return v


class CommitSettings(_Section):
    #: ``interval``: commit settled prefixes every ``interval_ms``; ``per-ack``: commit synchronously
    #: inside every Ack call (slow; for comparison).
    mode: Literal["interval", "per-ack"] = "interval"
    interval_ms: int = Field(100, ge=1)


class PublishSettings(_Section):
    max_message_bytes: int = Field(1_000_000, ge=1)
    max_batch_entries: int = Field(1000, ge=1)
    #: Records of one StreamingPublish stream being published at once; past it the sidecar stops
    #: reading that stream until some are answered (the app's writes then wait: flow control).
    max_stream_in_flight: int = Field(1000, ge=1)
    #: Topics Publish may write to. Empty allows any.
    allowed_topics: list[str] = Field(default_factory=list)
    timeout_seconds: float = Field(30, gt=0)
    #: Answer NOT_FOUND at once for a topic the cluster's metadata does not list (refreshed on a
    #: miss), instead of waiting timeout_seconds for Kafka to give up. Turn off for a cluster that
    #: creates topics on first write (auto.create.topics.enable).
    check_topics: bool = True


class CredentialSettings(_Section):
    """One caller the server knows, and what it may do. A call presents a credential with its
    bearer token, or, on an mTLS listener without a token, with its client certificate."""

    #: Named in log lines and PERMISSION_DENIED messages; never a secret.
    name: str = Field(min_length=1, max_length=128)
    #: Bearer tokens of this credential: one inline, and/or a file of one token per line (re-read
    #: when it changes, so a new token can be added before the old one is removed).
    token: SecretStr | None = None
    token_file: Path | None = None
    #: mTLS identities: a client certificate matches when its SPIFFE id, a SAN (DNS, URI, e-mail
    #: or IP) or its subject's common name is one of these.
    identities: list[str] = Field(default_factory=list)
    #: Topic patterns (fnmatch: ``orders.*``) this credential may Subscribe to and Ack, Nack and
    #: extend the records of, and ones it may Publish to. Empty: none.
    subscribe: list[str] = Field(default_factory=list)
    publish: list[str] = Field(default_factory=list)
    #: May Nack with dead_letter = true (send a record to the dead-letter topic at once).
    dead_letter: bool = False
    #: May call AdminService (status, key state).
    admin: bool = False

    @model_validator(mode="after")
    def _presented(self) -> CredentialSettings:
        if self.token is None and self.token_file is None and not self.identities:
            raise ValueError(
                f"server.credentials {self.name!r} has no token, token_file or identities: nothing could "
                "ever present it"
            )
        return self


MAX_WORKERS = 64


class ServerSettings(_Section):
    #: ``HOST:PORT``, or ``unix:///run/dedup/sidecar.sock`` (a Unix domain socket).
    listen: str = "127.0.0.1:50051"
    #: File mode of the Unix socket (octal), e.g. "0660" to let a group (a pod's fsGroup) connect.
    socket_mode: str = "0600"
    #: A second gRPC port that serves only grpc.health.v1 (for the kubelet's probes, which dial the
    #: pod IP): it may bind beyond loopback while the API stays on a Unix socket. Empty: none.
    health_listen: str = ""
    #: Prometheus /metrics; empty disables it.
    metrics_listen: str = "127.0.0.1:9464"
    #: Serve /metrics over HTTPS with this certificate and key (PEM).
    metrics_tls_cert_file: Path | None = None
    metrics_tls_key_file: Path | None = None
    #: Require ``authorization: Bearer <token>`` on every call when set (one app, every right).
    auth_token: SecretStr | None = None
    #: The same, from a file of one token per line, re-read when it changes: every token in it, and
    #: auth_token, are valid at once, so tokens rotate without a restart.
    auth_token_file: Path | None = None
    #: Named callers with their own tokens or mTLS identities and rights (see CredentialSettings).
    #: When set, they replace auth_token / auth_token_file.
    credentials: list[CredentialSettings] = Field(default_factory=list)
    #: TLS for the gRPC port: certificate chain and private key (PEM), re-read when they change.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: mTLS: require a client certificate signed by this CA (PEM).
    tls_client_ca_file: Path | None = None
    #: How often token and certificate files are checked for changes.
    reload_interval_seconds: float = Field(2.0, gt=0, le=3600)
    #: Start even when server.listen is reachable from other hosts with neither TLS nor a token.
    allow_insecure_remote: bool = False
    #: Worker processes: each is a member of the consumer group with its own consumer, producer and
    #: event loop, and serves on its own address (the port after server.listen's, or the socket
    #: ``NAME-i.sock``); clients list them with ListWorkers and connect to all. ``auto``: the CPUs
    #: this process may use (its affinity and its cgroup's CPU quota).
    workers: int | Literal["auto"] = 1
    max_streams: int = Field(16, ge=1)
    max_ids_per_call: int = Field(10_000, ge=1)
    #: Settle requests (acks, nacks, extensions) of one StreamingSubscribe stream worked on or
    #: waiting to be written at once; past it the sidecar stops reading that stream.
    max_stream_settles_in_flight: int = Field(1000, ge=1)
    shutdown_grace_seconds: float = Field(10, ge=0)

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if v != "auto" and not 1 <= int(v) <= MAX_WORKERS:
            raise ValueError(f"server.workers must be 1..{MAX_WORKERS} or 'auto', got {v!r}")
        return v

    @field_validator("socket_mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", v):
            raise ValueError(f"server.socket_mode must be an octal file mode such as '0660', got {v!r}")
        return v

    @model_validator(mode="after")
    def _secure(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("server.tls_cert_file and server.tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("server.tls_client_ca_file (mTLS) needs server.tls_cert_file and tls_key_file")
        if (self.metrics_tls_cert_file is None) != (self.metrics_tls_key_file is None):
            raise ValueError(
                "server.metrics_tls_cert_file and server.metrics_tls_key_file must be set together"
            )
        if is_unix_listen(self.listen):
            if not unix_socket_path(self.listen):
                raise ValueError(f"server.listen={self.listen!r} names no socket file (unix:///path)")
            if self.tls_cert_file is not None:
                raise ValueError(
                    "server.tls_cert_file: TLS is for TCP listeners; a Unix socket is guarded by its "
                    "file mode (server.socket_mode)"
                )
        else:
            try:
                split_listen(self.listen, "server.listen")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if self.identities_used and self.tls_client_ca_file is None:
            raise ValueError(
                "server.credentials name mTLS identities, but server.tls_client_ca_file is not set, so no "
                "client certificate is ever asked for"
            )
        names = [c.name for c in self.credentials]
        if len(set(names)) != len(names):
            raise ValueError(f"server.credentials names must be unique, got {names}")
        if self.credentials and (self.auth_token is not None or self.auth_token_file is not None):
            raise ValueError(
                "server.credentials replaces server.auth_token / auth_token_file: give that token to a "
                "credential instead"
            )
        remote = not self.allow_insecure_remote and not is_loopback_listen(self.listen)
        if remote and self.tls_cert_file is None and not self.asks_for_credentials:
            raise ValueError(
                f"server.listen={self.listen!r} is reachable from other hosts, with neither TLS "
                "(server.tls_cert_file) nor a token (server.auth_token, server.auth_token_file or "
                "server.credentials): anyone on the network could consume and publish. Listen on "
                "loopback or a Unix socket, set TLS or a token, or set "
                "server.allow_insecure_remote = true to accept that"
            )
        return self

    @property
    def asks_for_credentials(self) -> bool:
        """Whether callers must present a token or a client certificate."""
        return (
            self.auth_token is not None
            or self.auth_token_file is not None
            or bool(self.credentials)
            or self.tls_client_ca_file is not None
        )

    @property
    def identities_used(self) -> bool:
        return any(c.identities for c in self.credentials)


class TracingSettings(_Section):
    #: ``none``: spans are recorded only if the process installs an OpenTelemetry SDK itself;
    #: ``otlp``: export to ``otlp_endpoint`` (needs the ``otlp`` extra); ``console``: print them.
    #: W3C trace headers travel from Publish to the record and from the record to the app always.
    exporter: Literal["none", "otlp", "console"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4317"
    #: Share of publishes without a caller trace that start one (records follow their parent).
    sample_ratio: float = Field(1.0, ge=0, le=1)


class Settings(BaseSettings):
    """All sidecar settings. See deploy/sidecar.example.toml for each one explained."""

    model_config = SettingsConfigDict(env_prefix="DEDUP_", env_nested_delimiter="__", extra="forbid")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    commit: CommitSettings = Field(default_factory=CommitSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: ``text``: one readable line per record; ``json``: one JSON object per line
    #: (sidecar/observability/logs.py).
    log_format: Literal["text", "json"] = "text"
    #: Identity of this sidecar in store claims. Empty: a fresh random id per process.
    owner_id: str = ""

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.delivery.resume_unsettled > self.delivery.max_unsettled_per_partition:
            raise ValueError("delivery.resume_unsettled must not exceed delivery.max_unsettled_per_partition")
        d = self.delivery
        if d.retry_tiers_seconds and d.ordering != "unordered":
            raise ValueError(
                f"delivery.retry_tiers_seconds cannot be used with delivery.ordering = {d.ordering!r}: a "
                "record moved to a retry topic would let later records of its key pass it; set "
                "delivery.retry_tiers_seconds = [] (Nack delays then stay in memory) or "
                "ordering = 'unordered'"
            )
        if self.kafka.group_type == "share":
            if d.ordering != "unordered":
                raise ValueError(
                    f"delivery.ordering = {d.ordering!r} cannot be kept with kafka.group_type = 'share': a "
                    "share group hands the records of one partition to many members at once, in no "
                    "order. Set delivery.ordering = 'unordered', or kafka.group_type = 'consumer'"
                )
            if d.retry_tiers_seconds:
                raise ValueError(
                    "delivery.retry_tiers_seconds cannot be used with kafka.group_type = 'share' yet: a "
                    "record read from a retry topic before its due time would have to be held past its "
                    "share lock (share.record.lock.duration.ms). Set delivery.retry_tiers_seconds = []: "
                    "in share mode a Nack delay is held within the record's lock, then the record is "
                    "released to the broker"
                )
        if self.server.workers != 1 and self.store.backend == "memory":
            raise ValueError(
                f"server.workers = {self.server.workers!r} needs a store the workers share: the memory "
                "store is private to one process, so a record a worker processed would look new to the "
                "worker that takes its partition over. Set store.backend = 'sqlite' or 'redis', or "
                "server.workers = 1"
            )
        if d.retry_tiers_seconds:
            for t in self.kafka.topics:
                for i in range(len(d.retry_tiers_seconds)):
                    name = d.retry_topic.replace("{topic}", t).replace("{tier}", str(i))
                    if not valid_topic(name):
                        raise ValueError(
                            f"retry topic {name!r} (delivery.retry_topic) is not a valid topic name"
                        )
                    if name in self.kafka.topics:
                        raise ValueError(
                            f"retry topic {name!r} (delivery.retry_topic) is also in kafka.topics"
                        )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: flags (init kwargs), then the environment, then the TOML file.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = CONFIG_FILE.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


CONFIG_FILE: ContextVar[Path | None] = ContextVar("dedup_config_file", default=None)
