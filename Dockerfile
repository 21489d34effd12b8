# syntax=docker/dockerfile:1
# The dedup sidecar image. Build: docker build -t kafka-dedup-sidecar .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[uvloop]"

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /var/lib/dedup-sidecar --create-home dedup
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /var/lib/dedup-sidecar
# In a pod the app reaches the sidecar over loopback; bind all interfaces only when the app runs
# in another network namespace (compose), and then set server.auth_token.
ENV DEDUP_SERVER__LISTEN=127.0.0.1:50051 \
    DEDUP_SERVER__METRICS_LISTEN=0.0.0.0:9464 \
    DEDUP_STORE__SQLITE_PATH=/var/lib/dedup-sidecar/dedup.sqlite3 \
    PYTHONUNBUFFERED=1
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["dedup-sidecar"]
