"""Settings: layering, validation messages, and the reference file staying true."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from sidecar import config
from sidecar.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_reference_file_shows_the_defaults() -> None:
    data = tomllib.loads((ROOT / "deploy" / "sidecar.example.toml").read_text())
    from_file = config.Settings.model_validate(data)
    assert from_file.model_dump(mode="json") == config.Settings().model_dump(mode="json")


def test_layers_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[kafka]\ntopics = ["a"]\ngroup_id = "from-file"\nbootstrap_servers = "file:1"\n')
    monkeypatch.setenv("DEDUP_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("DEDUP_DELIVERY__MAX_ATTEMPTS", "9")
    s = config.load(f, kafka={"bootstrap_servers": "flag:1"})
    assert s.kafka.topics == ["a"]
    assert s.kafka.group_id == "from-env"
    assert s.kafka.bootstrap_servers == "flag:1"
    assert s.delivery.max_attempts == 9


def test_env_lists_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDUP_KAFKA__TOPICS", '["x", "y"]')
    assert config.load().kafka.topics == ["x", "y"]


def test_missing_file_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        config.load(tmp_path / "nope.toml")


def test_bad_values_name_the_setting() -> None:
    with pytest.raises(ValidationError, match=r"kafka\.topics"):
        config.load(kafka={"topics": ["bad topic"]})
    with pytest.raises(ValidationError, match="resume_unsettled"):
        config.load(delivery={"max_unsettled_per_partition": 10, "resume_unsettled": 20})
    with pytest.raises(ValidationError, match="backend"):
        config.load(store={"backend": "postgres"})


def test_secrets_do_not_print() -> None:
    s = config.load(
        store={"redis_url": "redis://user:hunter2@h:6379/0"}, server={"auth_token": "zq-secret-value"}
    )
    assert "hunter2" not in s.model_dump_json()
    assert "zq-secret-value" not in repr(s.server)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://s1:26379,s2:26379/", "/<master name>"),
        ("redis+sentinel://s1:26379/mymaster/zero", "/<master name>"),
        ("redis+sentinel://s1/mymaster", "host:port"),
        ("http://127.0.0.1:6379/0", "store.redis_url"),
    ],
)
def test_bad_redis_urls_name_the_setting(url: str, says: str) -> None:
    from sidecar.store.redis import RedisStore

    with pytest.raises(ConfigError, match=r"store\.redis_url") as info:
        RedisStore(url)
    assert says in str(info.value)


def test_tls_files_need_a_rediss_url() -> None:
    from sidecar.store.redis import RedisStore

    with pytest.raises(ConfigError, match=r"store\.redis_tls_\* files.*rediss://"):
        RedisStore("redis://127.0.0.1:6379/0", tls_ca_file="/etc/ca.pem")


async def test_store_errors_never_show_the_password() -> None:
    from sidecar.errors import StoreUnavailable
    from sidecar.store.redis import RedisStore

    store = RedisStore("redis://user:hunter2@127.0.0.1:1/0", timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match=r"unreachable.*store\.redis_url") as info:
        await store.ping()
    assert "hunter2" not in str(info.value)
    await store.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[kafka]\ntopicz = ["a"]\n', "unknown setting 'kafka.topicz' in .*; did you mean 'kafka.topics'"),
        ('[delivery]\nordering = "key"\n[kafkaa]\n', "unknown setting 'kafkaa' .*did you mean 'kafka'"),
        ("log_levle = 'INFO'\n", "unknown setting 'log_levle' .*did you mean 'log_level'"),
        ('[kafka\ntopics = ["a"]\n', r"config file .*c\.toml: .*\(at line 1, column 7\)"),
    ],
)
def test_a_file_with_a_typo_or_a_syntax_error_is_one_clear_line(
    tmp_path: Path, text: str, message: str
) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(f)


def test_dict_settings_take_any_key(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[kafka.consumer]\n"security.protocol" = "SASL_SSL"\n')
    assert config.load(f).kafka.consumer == {"security.protocol": "SASL_SSL"}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "DEDUP_KAFKA__TOPICZ",
            "unknown environment variable DEDUP_KAFKA__TOPICZ; did you mean 'DEDUP_KAFKA__TOPICS'",
        ),
        ("DEDUP_LOGLEVEL", "did you mean 'DEDUP_LOG_LEVEL'"),
        ("DEDUP_KAFKAA__TOPICS", "unknown environment variable DEDUP_KAFKAA__TOPICS"),
        ("DEDUP_LOG_LEVEL__X", "unknown environment variable DEDUP_LOG_LEVEL__X"),
    ],
)
def test_an_unknown_environment_variable_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, message: str
) -> None:
    monkeypatch.setenv(name, "x")
    with pytest.raises(ConfigError, match=message):
        config.load()


def test_other_dedup_variables_and_dict_subkeys_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDUP_TESTONLY_KILL_AT", "x:1")
    monkeypatch.setenv("DEDUP_CACHE_DIR", "/tmp")
    monkeypatch.setenv("DEDUP_KAFKA__PRODUCER__LINGER_MS", "5")
    assert config.load().kafka.producer == {"linger_ms": "5"}


def test_kafka_security_settings_are_checked_together() -> None:
    with pytest.raises(ValidationError, match=r"kafka\.sasl_mechanism, kafka\.sasl_username"):
        config.load(kafka={"security_protocol": "SASL_SSL"})
    with pytest.raises(ValidationError, match="not both"):
        config.load(
            kafka={
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "u",
                "sasl_password": "p",
                "sasl_password_file": "/run/secrets/p",
            }
        )
    with pytest.raises(ValidationError, match="set it to SASL_SSL"):
        config.load(kafka={"sasl_username": "u"})
    with pytest.raises(ValidationError, match="set it to SSL or SASL_SSL"):
        config.load(kafka={"ssl_ca_file": "/etc/ca.pem"})
    with pytest.raises(ValidationError, match="go together"):
        config.load(kafka={"security_protocol": "SSL", "ssl_cert_file": "/c.pem"})
    # Another mechanism through the pass-through maps is left to librdkafka.
    config.load(kafka={"security_protocol": "SASL_SSL", "consumer": {"sasl.mechanisms": "OAUTHBEARER"}})


def test_kafka_client_config_from_the_security_settings(tmp_path: Path) -> None:
    from sidecar.kafka.connect import client_config

    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = config.load(
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "orders",
            "sasl_password_file": str(secret),
            "ssl_ca_file": str(ca),
        }
    )
    conf = client_config(s.kafka)
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert (conf["sasl.username"], conf["sasl.password"]) == ("orders", "s3cret")
    assert conf["ssl.ca.location"] == str(ca)
    assert "s3cret" not in str(config.redacted(s))
    secret.write_text("")
    with pytest.raises(ConfigError, match=r"kafka\.sasl_password_file"):
        client_config(s.kafka)
    gone = config.load(kafka={"security_protocol": "SSL", "ssl_ca_file": str(tmp_path / "none.pem")})
    with pytest.raises(ConfigError, match=r"kafka\.ssl_ca_file"):
        client_config(gone.kafka)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"group.protocol": "consumer"}, "kafka.group_protocol"),
        ({"session.timeout.ms": 6000}, "kafka.session_timeout_ms"),
        ({"enable.auto.commit": True}, "owns to keep its guarantees"),
    ],
)
def test_consumer_properties_the_sidecar_sets_are_refused_naming_the_setting(
    extra: dict[str, object], named: str
) -> None:
    from sidecar.errors import ConfigError
    from sidecar.kafka.consumer import OWNED_PROPERTIES
    from sidecar.process.app import _kafka_config

    settings = config.load(None, kafka={"consumer": extra})
    with pytest.raises(ConfigError, match=named):
        _kafka_config(settings, settings.kafka.consumer, OWNED_PROPERTIES, "consumer")


def test_the_consumer_protocol_is_a_setting() -> None:
    assert config.load(None).kafka.group_protocol == "classic"
    assert config.load(None, kafka={"group_protocol": "consumer"}).kafka.group_protocol == "consumer"
    with pytest.raises(ValueError, match="group_protocol"):
        config.load(None, kafka={"group_protocol": "eager"})


def test_queue_mode_refuses_ordering_and_retry_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDUP_KAFKA__GROUP_TYPE", "share")
    assert config.Settings().kafka.group_type == "share"
    for ordering in ("key", "partition"):
        with pytest.raises(ValidationError, match=r"delivery\.ordering = .* kafka\.group_type = 'share'"):
            config.Settings(delivery={"ordering": ordering})
    tiers = r"delivery\.retry_tiers_seconds .* kafka\.group_type = 'share'"
    with pytest.raises(ValidationError, match=tiers):
        config.Settings(delivery={"retry_tiers_seconds": [60]})
    with pytest.raises(ValidationError, match="group_type"):
        config.Settings(kafka={"group_type": "queue"})
    # The consumer group keeps both.
    monkeypatch.setenv("DEDUP_KAFKA__GROUP_TYPE", "consumer")
    assert config.Settings(delivery={"ordering": "key"}).delivery.ordering == "key"
