"""Binding the sidecar's ports: TCP with or without TLS, a Unix domain socket with a file mode, and
the Prometheus endpoint (HTTP or HTTPS). Each failure names the setting to change."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import stat
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from sidecar.api.security import Certificates
from sidecar.config import ServerSettings, is_unix_listen, split_listen, unix_socket_path
from sidecar.errors import ConfigError


def _prepare_socket(path: Path, setting: str) -> None:
    """Refuse a socket path whose directory is missing, or that names something other than a
    socket; remove a socket left by a process that is gone (a live one refuses the bind below)."""
    if not path.parent.is_dir():
        raise ConfigError(
            f"{setting}: the directory {str(path.parent)!r} of the socket does not exist; create it (in a "
            "pod: an emptyDir volume shared with the app)"
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{setting}: {str(path)!r} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens on it: stale
    else:
        raise ConfigError(f"{setting}: another process is listening on {str(path)!r}")
    finally:
        probe.close()


def bind(
    server: grpc.aio.Server,
    listen: str,
    setting: str,
    certs: Certificates | None = None,
    socket_mode: str = "0600",
) -> int:
    """Add the listen address to ``server``. Returns the TCP port bound (0 for a Unix socket)."""
    if is_unix_listen(listen):
        path = Path(unix_socket_path(listen))
        _prepare_socket(path, setting)
        old = os.umask(0o177)  # no other user can connect in the moment before the chmod below
        try:
            bound = server.add_insecure_port(f"unix:{path}")
        finally:
            os.umask(old)
        if not bound or not path.exists():
            raise ConfigError(f"cannot listen on {listen} ({setting}): the socket could not be created")
        os.chmod(path, int(socket_mode, 8))
        return 0
    host, port = split_listen(listen, setting)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if certs is not None:
            bound = server.add_secure_port(address, certs.credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise ConfigError(f"cannot listen on {listen} ({setting}): address in use or invalid")
    return int(bound)


def remove_socket(listen: str) -> None:
    if is_unix_listen(listen):
        with contextlib.suppress(OSError):
            path = Path(unix_socket_path(listen))
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()


def metrics(s: ServerSettings, registry: CollectorRegistry) -> tuple[Any, int]:
    """Start /metrics on server.metrics_listen: HTTPS when server.metrics_tls_cert_file is set."""
    host, port = split_listen(s.metrics_listen, "server.metrics_listen")
    tls: dict[str, Any] = {}
    if s.metrics_tls_cert_file is not None and s.metrics_tls_key_file is not None:
        for f, name in ((s.metrics_tls_cert_file, "cert"), (s.metrics_tls_key_file, "key")):
            if not f.is_file():
                raise ConfigError(f"server.metrics_tls_{name}_file {str(f)!r} does not exist")
        tls = {"certfile": os.fspath(s.metrics_tls_cert_file), "keyfile": os.fspath(s.metrics_tls_key_file)}
    try:
        server, _ = start_http_server(port, host, registry=registry, **tls)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {s.metrics_listen} (server.metrics_listen): {exc.strerror}"
        ) from None
    except ssl.SSLError as exc:  # a certificate and key that do not match
        raise ConfigError(
            f"cannot serve metrics over TLS (server.metrics_tls_cert_file / metrics_tls_key_file): "
            f"{type(exc).__name__}"
        ) from None
    return server, int(server.server_port)
