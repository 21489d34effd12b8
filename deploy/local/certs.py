"""Test certificates with the openssl command: a CA, and certificates it signs for servers and
clients (with DNS, IP, URI and SPIFFE subject alternative names). For local runs and tests only;
production certificates come from your PKI (cert-manager, SPIRE, ...).

    python deploy/local/certs.py DIR --server localhost --client orders=spiffe://example.org/orders

writes DIR/ca.pem, DIR/server.pem + server.key, DIR/orders.pem + orders.key.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class CertificateAuthority:
    """A throwaway CA in ``directory`` (ca.pem, ca.key), valid for ``days``."""

    def __init__(self, directory: Path, name: str = "dedup-test-ca", days: int = 2) -> None:
        if shutil.which("openssl") is None:
            raise RuntimeError("the openssl command is needed to make test certificates")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.days = days
        self.cert = self.dir / "ca.pem"
        self.key = self.dir / "ca.key"
        if not self.cert.exists():
            self._run(
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", self.key, "-out", self.cert, "-days", str(days), "-subj", f"/CN={name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            )  # fmt: skip

    def _run(self, *args: object) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, cwd=self.dir)

    def issue(
        self, name: str, sans: list[str], common_name: str | None = None, days: int | None = None
    ) -> Issued:
        """A certificate and key signed by this CA. ``sans`` are openssl names: ``DNS:localhost``,
        ``IP:127.0.0.1``, ``URI:spiffe://example.org/app``."""
        key, csr, cert = self.dir / f"{name}.key", self.dir / f"{name}.csr", self.dir / f"{name}.pem"
        ext = self.dir / f"{name}.ext"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        lines.append("extendedKeyUsage=serverAuth,clientAuth")
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        self._run(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
            "-out", csr, "-subj", f"/CN={common_name or name}",
        )  # fmt: skip
        self._run(
            "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key, "-CAcreateserial",
            "-out", cert, "-days", str(days or self.days), "-extfile", ext,
        )  # fmt: skip
        csr.unlink()
        ext.unlink()
        key.chmod(0o600)
        return Issued(cert, key)

    def server(self, name: str = "server", hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Issued:
        sans = [f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts]
        return self.issue(name, sans, common_name=hosts[0])


def main() -> None:
    p = argparse.ArgumentParser(description="Make a test CA and certificates it signs (openssl).")
    p.add_argument("directory")
    p.add_argument("--server", action="append", default=[], help="a server certificate for this host")
    p.add_argument("--client", action="append", default=[], help="NAME=SAN URI (e.g. a SPIFFE id)")
    a = p.parse_args()
    ca = CertificateAuthority(Path(a.directory), days=365)
    for host in a.server:
        print(ca.server(host, (host,)).cert)
    for spec in a.client:
        name, _, uri = spec.partition("=")
        print(ca.issue(name, [f"URI:{uri}"] if uri else []).cert)
    print(ca.cert)


if __name__ == "__main__":
    main()
