"""Listen settings: HOST:PORT or a Unix socket, and whether one is reachable only from this host."""

from __future__ import annotations

import ipaddress

from sidecar.errors import ConfigError


def split_listen(listen: str, setting: str) -> tuple[str, int]:
    """HOST:PORT of a listen setting; an empty host is loopback. ConfigError names the setting."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{setting}={listen!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


_LOOPBACK_HOSTS = ("localhost",)


def is_unix_listen(listen: str) -> bool:
    return listen.startswith("unix:")


def unix_socket_path(listen: str) -> str:
    """The file of a ``unix:///abs/path`` or ``unix:relative/path`` listen setting."""
    rest = listen[len("unix:") :]
    return rest[2:] if rest.startswith("//") else rest


def is_loopback_listen(listen: str) -> bool:
    """A listen setting reachable only from this host: a Unix socket, or a loopback address."""
    if is_unix_listen(listen):
        return True
    host, _ = split_listen(listen, "server.listen")
    if host in _LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything
