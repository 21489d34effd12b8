"""One redis-server on 127.0.0.1 (plain or TLS, with a password or not), and redis-cli against it."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .install import log, redis_cli_binary, redis_server_binary
from .processes import Service, free_port, spawn, wait_port
from .tls import TlsFiles


@dataclass
class RedisServer(Service):
    port: int = 0
    tls: TlsFiles | None = None
    password: str | None = None  # what redis-cli authenticates with (a Sentinel's requirepass)

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        workdir: Path,
        appendonly: str = "no",
        timeout: float = 30.0,
        port: int = 0,
        password: str | None = None,
        extra_args: list[str] | None = None,
        tls: TlsFiles | None = None,
    ) -> RedisServer:
        """Start redis-server on 127.0.0.1. ``tls``: serve TLS only (on ``port``), asking clients for
        a certificate signed by its CA but not requiring one. ``extra_args``: more config flags."""
        binary = redis_server_binary()
        workdir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        log_path = workdir / "redis.log"
        args = [binary, "--bind", "127.0.0.1"]
        if tls is None:
            args += ["--port", str(port)]
        else:
            args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.server_cert),
                     "--tls-key-file", str(tls.server_key), "--tls-ca-cert-file", str(tls.ca),
                     "--tls-auth-clients", "optional"]  # fmt: skip
        args += ["--dir", str(workdir), "--save", "", "--daemonize", "no", "--logfile", str(log_path)]
        args += ["--repl-diskless-sync-delay", "0"]  # a replica syncs at once, not 5 s later
        if password:
            args += ["--requirepass", password]
        if appendonly in ("always", "everysec"):
            args += ["--appendonly", "yes", "--appendfsync", appendonly]
        else:
            args += ["--appendonly", "no"]
        args += extra_args or []
        proc = spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = cls(proc=proc, workdir=workdir, log_path=log_path, port=port, tls=tls)
        try:
            wait_port(port, time.monotonic() + timeout, proc, "redis-server")
        except BaseException:
            log(server.log_tail())
            server.stop()
            raise
        return server

    def restart(self) -> None:
        self.stop()
        args = [str(a) for a in self.proc.args]  # type: ignore[union-attr]
        self.proc = spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, time.monotonic() + 30, self.proc, "redis-server")

    def cli(self, *command: str, timeout: float = 10) -> str:
        """Run one command with redis-cli against this server; return its raw output."""
        args = [redis_cli_binary(), "-h", "127.0.0.1", "-p", str(self.port)]
        if self.tls is not None:
            args += ["--tls", "--cacert", str(self.tls.ca)]
        if self.password:
            args += ["--no-auth-warning", "-a", self.password]
        out = subprocess.run([*args, *command], capture_output=True, text=True, timeout=timeout)
        # redis-cli exits 0 on an error reply too: it prints it (ERR, NOPERM, ...) on stdout.
        first = out.stdout.split(" ", 1)[0]
        if out.returncode != 0 or (first.isupper() and first.isalpha() and first not in ("OK", "PONG")):
            said = (out.stderr or out.stdout).strip()
            raise RuntimeError(f"redis-cli {command[0]} on {self.address}: {said}")
        return out.stdout

    def info(self, section: str) -> dict[str, str]:
        fields = (line.partition(":") for line in self.cli("INFO", section).splitlines())
        return {k: v.strip() for k, sep, v in fields if sep and not k.startswith("#")}

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
