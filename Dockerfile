# syntax=docker/dockerfile:1
# The dedup sidecar image. Build: docker build -t kafka-dedup-sidecar .
#
# - Runtime dependencies come from deploy/requirements.lock, every file checked against its
#   hash (pip --require-hashes); the sidecar's own wheel is installed without resolving anything.
# - It runs as a non-root user (uid 10001) and works on a read-only root filesystem. The paths it
#   writes, each a volume in deploy/kubernetes and deploy/compose.yaml:
#     /var/lib/dedup-sidecar  the SQLite store (store.backend = "sqlite", the default)
#     /run/dedup              the Unix socket (server.listen = "unix:///run/dedup/sidecar.sock")
#   With store.backend = "redis" and a TCP listener it writes nothing at all.
FROM python:3.11-slim-bookworm AS build
# A C compiler for the sidecar's compiled modules (setup.py): the Subscribe frame encoder and the
# record path compiled with mypyc. It stays in this stage: the runtime image gets the wheel only.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY sidecar ./sidecar
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
COPY deploy/requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock && rm /tmp/requirements.lock
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels \
    && python -m compileall -q "$(python -c 'import sidecar, os; print(os.path.dirname(sidecar.__file__))')" \
    && python -c 'from sidecar.process import build; assert build.describe() == "frame encoder c, engine compiled", build.describe()' \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin dedup \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/dedup-sidecar /run/dedup
USER 10001:10001
WORKDIR /var/lib/dedup-sidecar
VOLUME ["/var/lib/dedup-sidecar", "/run/dedup"]
# The app in the same pod reaches the sidecar over loopback or, better, the Unix socket in a
# shared volume. Listening beyond loopback needs TLS or a token (docs/SECURITY.md).
ENV DEDUP_SERVER__LISTEN=127.0.0.1:50051 \
    DEDUP_SERVER__METRICS_LISTEN=0.0.0.0:9464 \
    DEDUP_STORE__SQLITE_PATH=/var/lib/dedup-sidecar/dedup.sqlite3 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["dedup-sidecar"]
