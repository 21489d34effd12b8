"""Who is calling, and may they: tokens (inline and from files that rotate), mTLS identities,
per-credential topic rights, and TLS certificates re-read when their files change.

One app per sidecar is the simple default: ``server.auth_token`` (or ``auth_token_file``) makes one
credential with every right. ``server.credentials`` names several, each with its own rights.
A token is compared in constant time against every valid one; no token or certificate content is
ever written into a log line or an error message (tests/integration/test_security.py checks it).
"""

from __future__ import annotations

import fnmatch
import hmac
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from sidecar.config import CredentialSettings, ServerSettings
from sidecar.errors import ConfigError, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

#: The auth context properties an mTLS identity is matched against, most specific first.
_IDENTITY_PROPERTIES = ("peer_spiffe_id", "x509_subject_alternative_name", "x509_common_name")


@dataclass(frozen=True, slots=True)
class Principal:
    """A caller the server recognised, and its rights. ``setting`` names where they are written."""

    name: str
    setting: str
    subscribe: tuple[str, ...] = ("*",)
    publish: tuple[str, ...] = ("*",)
    dead_letter: bool = True
    admin: bool = True

    def check_subscribe(self, topic: str, action: str = "subscribe to") -> None:
        if not _matches(topic, self.subscribe):
            raise PermissionDenied(
                f"credential {self.name!r} may not {action} topic {topic!r} "
                f"({self.setting}.subscribe = {list(self.subscribe)})"
            )

    def check_publish(self, topic: str) -> None:
        if not _matches(topic, self.publish):
            raise PermissionDenied(
                f"credential {self.name!r} may not publish to topic {topic!r} "
                f"({self.setting}.publish = {list(self.publish)})"
            )

    def check_dead_letter(self) -> None:
        if not self.dead_letter:
            raise PermissionDenied(
                f"credential {self.name!r} may not Nack with dead_letter ({self.setting}.dead_letter = false)"
            )

    def check_admin(self) -> None:
        if not self.admin:
            raise PermissionDenied(
                f"credential {self.name!r} may not call AdminService ({self.setting}.admin = false)"
            )

    @property
    def unrestricted(self) -> bool:
        return self.subscribe == ("*",) and self.publish == ("*",) and self.dead_letter and self.admin


def _matches(topic: str, patterns: Sequence[str]) -> bool:
    return any(p == "*" or p == topic or fnmatch.fnmatchcase(topic, p) for p in patterns)


#: The caller when the server asks for no credential at all.
ANYONE = Principal("anonymous", "server")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read_tokens(path: Path, setting: str) -> list[bytes]:
    """The tokens of a token file: one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {setting} {str(path)!r}: {type(exc).__name__}") from None
    tokens = [line.strip() for line in text.splitlines()]
    return [t.encode() for t in tokens if t and not t.startswith("#")]


@dataclass
class _Source:
    """The tokens one credential is presented with: inline, and from its file (re-read on change)."""

    principal: Principal
    inline: bytes | None
    path: Path | None
    setting: str
    stamp: tuple[int, int, int] | None = None
    from_file: list[bytes] = field(default_factory=list)

    def load(self, first: bool) -> bool:
        """Re-read the file if it changed; True if it did. At start-up a bad file is an error; later
        it is logged and the tokens read before stay valid (a half-written file must not lock the
        app out)."""
        if self.path is None:
            return False
        stamp = _stamp(self.path)
        if stamp == self.stamp and not first:
            return False
        try:
            tokens = read_tokens(self.path, self.setting)
        except ConfigError:
            if first:
                raise
            log.warning("%s %s cannot be read; the tokens read before stay valid", self.setting, self.path)
            return False
        if not tokens:
            if first:
                raise ConfigError(f"{self.setting} {str(self.path)!r} holds no token")
            log.warning("%s %s holds no token; the tokens read before stay valid", self.setting, self.path)
            return False
        self.stamp, self.from_file = stamp, tokens
        return True

    def tokens(self) -> Iterable[bytes]:
        if self.inline is not None:
            yield self.inline
        yield from self.from_file


class Guard:
    """Resolves each call's credential and checks its rights. ``required`` is False when the
    server asks for nothing (then every call is ANYONE, with every right)."""

    def __init__(self, s: ServerSettings) -> None:
        self._sources: list[_Source] = []
        self._identities: dict[bytes, Principal] = {}
        self._tokens: list[tuple[bytes, Principal]] = []
        self.mtls = s.tls_client_ca_file is not None
        if s.credentials:
            for i, c in enumerate(s.credentials):
                self._add_credential(c, f"server.credentials[{i}]")
        elif s.auth_token is not None or s.auth_token_file is not None:
            everything = Principal("default", "server")
            inline = s.auth_token.get_secret_value().encode() if s.auth_token is not None else None
            self._sources.append(_Source(everything, inline, s.auth_token_file, "server.auth_token_file"))
        for src in self._sources:
            src.load(first=True)
        self._rebuild()
        #: Any verified client certificate is enough when mTLS is on and no identity is mapped.
        self._any_certificate = self.mtls and not self._identities and not self._sources
        self.required = bool(self._sources or self._identities or self._any_certificate)

    def _add_credential(self, c: CredentialSettings, where: str) -> None:
        p = Principal(c.name, where, tuple(c.subscribe), tuple(c.publish), c.dead_letter, c.admin)
        if c.token is not None or c.token_file is not None:
            inline = c.token.get_secret_value().encode() if c.token is not None else None
            self._sources.append(_Source(p, inline, c.token_file, f"{where}.token_file"))
        for ident in c.identities:
            self._identities[ident.encode()] = p

    def _rebuild(self) -> None:
        # One assignment: a call reads the old list or the new one, never a half-built one.
        self._tokens = [(t, src.principal) for src in self._sources for t in src.tokens()]

    def reload(self) -> None:
        """Re-read token files that changed (called every server.reload_interval_seconds)."""
        changed = [src for src in self._sources if src.load(first=False)]
        if changed:
            self._rebuild()
            for src in changed:
                log.info("re-read %s for credential %r", src.setting, src.principal.name)

    def _by_token(self, presented: bytes) -> Principal | None:
        found = None
        for token, principal in self._tokens:  # compare with every one: no timing hint of which
            if hmac.compare_digest(presented, token):
                found = principal
        return found

    def principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        """The calling credential. Raises Unauthenticated (no or a wrong token) or PermissionDenied
        (a verified certificate that no credential names)."""
        if not self.required:
            return ANYONE
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                raw = value.encode() if isinstance(value, str) else value
                scheme, _, presented = raw.partition(b" ")
                if scheme.lower() == b"bearer" and presented:
                    p = self._by_token(presented.strip())
                    if p is not None:
                        return p
                raise Unauthenticated(
                    "the bearer token in the 'authorization' metadata is not valid (server.auth_token, "
                    "server.auth_token_file or server.credentials)"
                )
        if self.mtls:
            auth = context.auth_context()
            if self._any_certificate and auth.get("x509_pem_cert"):
                return ANYONE
            seen: list[str] = []
            for prop in _IDENTITY_PROPERTIES:
                for ident in auth.get(prop, ()):
                    p = self._identities.get(ident)
                    if p is not None:
                        return p
                    seen.append(ident.decode(errors="replace"))
            if seen:
                raise PermissionDenied(
                    f"the client certificate ({', '.join(dict.fromkeys(seen))}) matches no "
                    "server.credentials identities"
                )
        raise Unauthenticated(
            "this call needs 'authorization: Bearer <token>' metadata (server.auth_token, "
            "server.auth_token_file or server.credentials)"
            + (" or a client certificate a credential names" if self._identities else "")
        )


class Certificates:
    """The gRPC port's TLS credentials. grpc asks ``_fetch`` at every handshake; it answers with a
    new configuration once ``reload`` has read changed files, so new connections use a rotated
    certificate while open ones keep theirs."""

    def __init__(self, s: ServerSettings) -> None:
        assert s.tls_cert_file is not None
        assert s.tls_key_file is not None
        self._files = [s.tls_cert_file, s.tls_key_file] + (
            [s.tls_client_ca_file] if s.tls_client_ca_file else []
        )
        self._stamps = [_stamp(p) for p in self._files]
        self._pending: Any = None
        self._lock = threading.Lock()
        self.mtls = s.tls_client_ca_file is not None
        first = self._configuration()
        self.credentials = grpc.dynamic_ssl_server_credentials(
            first, self._fetch, require_client_authentication=self.mtls
        )

    def _configuration(self) -> Any:
        settings = ("server.tls_cert_file", "server.tls_key_file", "server.tls_client_ca_file")
        blobs: list[bytes] = []
        for path, setting in zip(self._files, settings, strict=False):
            try:
                blobs.append(path.read_bytes())
            except OSError as exc:
                raise ConfigError(f"cannot read {setting} {str(path)!r}: {exc.strerror}") from None
        cert, key = blobs[0], blobs[1]
        for i, marker in ((0, b"CERTIFICATE"), (1, b"PRIVATE KEY")):
            if b"-----BEGIN " not in blobs[i] or marker not in blobs[i]:
                kind = marker.decode().lower()
                raise ConfigError(f"{settings[i]} {str(self._files[i])!r} is not a PEM {kind}")
        _check_pair(self._files[0], self._files[1])
        ca = blobs[2] if self.mtls else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def reload(self) -> None:
        stamps = [_stamp(p) for p in self._files]
        if stamps == self._stamps:
            return
        self._stamps = stamps
        try:
            cfg = self._configuration()
        except ConfigError as exc:
            log.warning("TLS files changed but cannot be used yet (%s); the ones read before stay", exc)
            return
        with self._lock:
            self._pending = cfg
        log.info("re-read the TLS certificate files; new connections use them")

    def _fetch(self) -> Any:
        with self._lock:
            cfg, self._pending = self._pending, None
        return cfg


def _check_pair(cert: Path, key: Path) -> None:
    """Fail with the setting's name when the key does not belong to the certificate (grpc would
    only fail at the first handshake, with a message about neither)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"server.tls_cert_file {str(cert)!r} and server.tls_key_file {str(key)!r} do not form a "
            f"certificate and its key ({exc.reason or 'unreadable'})"
        ) from None
