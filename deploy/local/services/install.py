"""Installing what the services run: the broker's jars (Maven Central), redis-server, openssl
and promtool (Debian's packages), and Java. Everything is cached in ``cache_dir()``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # deploy/local
POM = HERE / "kafka" / "pom.xml"
LOG4J2 = HERE / "kafka" / "log4j2.properties"


def log(msg: str) -> None:
    print(f"[services] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("DEDUP_CACHE_DIR", Path.home() / ".cache" / "kafka-dedup-sidecar"))


def kafka_version() -> str:
    text = POM.read_text()
    start = text.index("<kafka.version>") + len("<kafka.version>")
    return text[start : text.index("</kafka.version>", start)]


# --------------------------------------------------------------------------------------------
# installation


def kafka_lib_dir() -> Path:
    """Return the cached directory of broker jars, resolving them with Maven on first use."""
    lib = cache_dir() / f"kafka-{kafka_version()}" / "lib"
    marker = lib / ".complete"
    if marker.exists():
        return lib
    if shutil.which("mvn") is None:
        raise RuntimeError("Maven (mvn) is needed to fetch the Kafka broker jars; install it first")
    log(f"fetching Apache Kafka {kafka_version()} jars with Maven into {lib} (first run only)")
    tmp = lib.with_name("lib.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(
        [
            "mvn",
            "-B",
            "-q",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ],
        check=True,
    )
    shutil.rmtree(lib, ignore_errors=True)
    tmp.rename(lib)
    marker.touch()
    return lib


def redis_server_binary() -> str:
    """Return the path of redis-server, installing Debian's package when it is missing."""
    found = shutil.which("redis-server")
    if found:
        return found
    found = debian_tool("redis-server", "redis-server")
    # Debian may start a system instance on 6379; we never use it, and leave nothing running.
    subprocess.run(["service", "redis-server", "stop"], check=False, capture_output=True)
    return found


def _apt_install(package: str) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(f"{package} is missing; install Debian's package: apt-get install {package}")
    log(f"installing Debian's {package} package (first run only)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], check=True, env=env
    )


def debian_tool(command: str, package: str) -> str:
    """Return the path of ``command``, installing Debian's ``package`` when it is missing."""
    found = shutil.which(command)
    if not found:
        _apt_install(package)
        found = shutil.which(command)
    if not found:
        raise RuntimeError(f"apt-get installed {package} but {command} is not on PATH")
    return found


def promtool_binary() -> str:
    """Return the path of promtool (to check deploy/monitoring's alert rules): one on PATH, or
    the one in Debian's prometheus package, unpacked into the cache. The package is downloaded and
    unpacked, not installed, so no Prometheus server is set up on the machine."""
    found = shutil.which("promtool")
    if found:
        return found
    target = cache_dir() / "promtool"
    binary = target / "usr" / "bin" / "promtool"
    if binary.exists():
        return str(binary)
    target.mkdir(parents=True, exist_ok=True)
    log("fetching promtool from Debian's prometheus package (first run only)")
    download = target / "download"
    download.mkdir(exist_ok=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    got = subprocess.run(["apt-get", "download", "-qq", "prometheus"], cwd=download, env=env, check=False)
    if got.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "download", "-qq", "prometheus"], cwd=download, env=env, check=True)
    [deb] = sorted(download.glob("prometheus_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    deb.unlink()
    (binary.parent / "prometheus").unlink(missing_ok=True)  # the server itself is not needed
    if not binary.exists():
        raise RuntimeError(f"Debian's prometheus package has no usr/bin/promtool ({deb.name})")
    return str(binary)


def openssl_binary() -> str:
    """Return the path of openssl (for test certificates)."""
    return debian_tool("openssl", "openssl")


def java_binary() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise RuntimeError("java is needed to run the Kafka broker (Java 17 or newer); set JAVA_HOME")
    return found


def redis_cli_binary() -> str:
    """Return the path of redis-cli (Debian's redis-tools, which redis-server brings)."""
    if not shutil.which("redis-cli"):
        redis_server_binary()
    return debian_tool("redis-cli", "redis-tools")
