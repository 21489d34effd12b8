"""Settings validation and the Guard's decisions, without a server (the real listeners are in
tests/integration/test_security.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sidecar import config
from sidecar.api.security import ANYONE, Guard
from sidecar.errors import ConfigError, PermissionDenied, Unauthenticated


class FakeContext:
    def __init__(
        self, metadata: tuple[tuple[str, str], ...] = (), auth: dict[str, list[bytes]] | None = None
    ):
        self._metadata = metadata
        self._auth = auth or {}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def fake(metadata: tuple[tuple[str, str], ...] = (), auth: dict[str, list[bytes]] | None = None) -> Any:
    return FakeContext(metadata, auth or {})


def bearer(token: str) -> Any:
    return fake((("authorization", f"Bearer {token}"),))


def server(**values: Any) -> config.ServerSettings:
    return config.load(server=values).server


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", "sidecar.internal:50051", ":50051x"]
)
def test_a_remote_listen_without_tls_or_a_token_is_refused(listen: str) -> None:
    with pytest.raises(ValidationError, match=r"server\.allow_insecure_remote|server\.listen"):
        server(listen=listen)


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:50051", "127.8.9.1:1", "[::1]:50051", "localhost:50051", "unix:///run/x.sock"]
)
def test_loopback_and_unix_sockets_need_nothing(listen: str) -> None:
    assert server(listen=listen).listen == listen


def test_what_makes_a_remote_listen_acceptable(tmp_path: Path) -> None:
    remote = "0.0.0.0:50051"
    server(listen=remote, allow_insecure_remote=True)
    server(listen=remote, auth_token="t")
    server(listen=remote, auth_token_file=str(tmp_path / "t"))
    server(listen=remote, tls_cert_file="c.pem", tls_key_file="k.pem")


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"tls_cert_file": "c.pem"}, "tls_key_file must be set together"),
        ({"tls_client_ca_file": "ca.pem"}, "tls_client_ca_file (mTLS) needs"),
        ({"listen": "unix:///s.sock", "tls_cert_file": "c", "tls_key_file": "k"}, "a Unix socket"),
        ({"listen": "unix://"}, "names no socket file"),
        ({"socket_mode": "rw-rw----"}, "octal file mode"),
        ({"credentials": [{"name": "a", "subscribe": ["*"]}]}, "no token, token_file or identities"),
        ({"credentials": [{"name": "a", "identities": ["spiffe://x"]}]}, "tls_client_ca_file is not set"),
        ({"credentials": [{"name": "a", "token": "x"}, {"name": "a", "token": "y"}]}, "must be unique"),
        ({"credentials": [{"name": "a", "token": "x"}], "auth_token": "y"}, "replaces server.auth_token"),
    ],
)
def test_inconsistent_settings_name_what_to_change(values: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError) as info:
        server(**values)
    assert says in str(info.value)


def test_no_credential_asked_means_everyone_with_every_right() -> None:
    guard = Guard(server())
    assert not guard.required
    assert guard.principal(fake()) is ANYONE


def test_token_file_tokens_and_the_inline_token_are_all_valid(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# comment\n\n first \nsecond\n")
    guard = Guard(server(auth_token="inline", auth_token_file=str(f)))
    for token in ("inline", "first", "second"):
        assert guard.principal(bearer(token)).unrestricted
    with pytest.raises(Unauthenticated, match="not valid") as info:
        guard.principal(bearer("guess"))
    assert "guess" not in str(info.value)
    with pytest.raises(Unauthenticated, match="needs 'authorization: Bearer"):
        guard.principal(fake())
    f.write_text("third\n")
    guard.reload()
    assert guard.principal(bearer("third")).unrestricted
    with pytest.raises(Unauthenticated):
        guard.principal(bearer("first"))


def test_a_missing_or_empty_token_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read server\.auth_token_file"):
        Guard(server(auth_token_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match="holds no token"):
        Guard(server(auth_token_file=str(tmp_path / "empty")))


def test_credentials_rights_and_the_messages_that_name_the_rule() -> None:
    guard = Guard(
        server(
            tls_cert_file="c",
            tls_key_file="k",
            tls_client_ca_file="ca",
            credentials=[
                {"name": "orders", "identities": ["spiffe://t/orders"], "subscribe": ["orders.*"]},
                {"name": "ops", "token": "ops-t", "admin": True, "publish": ["*"], "dead_letter": True},
            ],
        )
    )
    orders = guard.principal(fake(auth={"peer_spiffe_id": [b"spiffe://t/orders"]}))
    assert orders.name == "orders"
    orders.check_subscribe("orders.eu")
    with pytest.raises(PermissionDenied, match=r"'payments' \(server\.credentials\[0\]\.subscribe"):
        orders.check_subscribe("payments")
    with pytest.raises(PermissionDenied, match=r"server\.credentials\[0\]\.publish = \[\]"):
        orders.check_publish("orders.eu")
    with pytest.raises(PermissionDenied, match=r"server\.credentials\[0\]\.dead_letter = false"):
        orders.check_dead_letter()
    with pytest.raises(PermissionDenied, match=r"server\.credentials\[0\]\.admin = false"):
        orders.check_admin()
    ops = guard.principal(bearer("ops-t"))
    ops.check_admin()
    ops.check_publish("anything")
    with pytest.raises(PermissionDenied, match=r"matches no server\.credentials identities"):
        guard.principal(fake(auth={"x509_common_name": [b"someone"], "x509_pem_cert": [b"-"]}))


def test_secrets_are_masked_in_the_printed_settings() -> None:
    s = config.load(
        kafka={"consumer": {"sasl.password": "p1", "sasl.username": "u"}, "producer": {"ssl.key.pem": "k"}},
        server={"credentials": [{"name": "a", "token": "tok-1"}]},
    )
    printed = str(config.redacted(s))
    assert "p1" not in printed
    assert "'k'" not in printed
    assert "tok-1" not in printed
    assert "'u'" in printed  # not a secret
