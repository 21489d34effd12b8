"""A throwaway CA and certificates for TLS tests (openssl)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .install import openssl_binary


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def generate(cls, directory: Path) -> TlsFiles:
        """Make the files with openssl (valid one day; the server's SAN is IP 127.0.0.1 and localhost)."""
        openssl = openssl_binary()
        directory.mkdir(parents=True, exist_ok=True)
        d = directory

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], check=True, capture_output=True)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=dedup-test-ca",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))  # fmt: skip
        for name, ext in (
            ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
            ("client", "extendedKeyUsage=clientAuth"),
        ):
            (d / f"{name}.ext").write_text(ext + "\n")
            run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=dedup-test-{name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
            run("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
                "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"))  # fmt: skip
        return cls(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")
