"""``dedup-sidecar status`` and ``dedup-sidecar key TOPIC KEY``: ask a running sidecar.

They dial the sidecar's gRPC port (``--target``, else ``server.listen`` from the same settings the
sidecar reads) with its token (``--token``, else ``server.auth_token``), call AdminService, and
print a human-readable answer, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from sidecar import config
from sidecar._proto import dedup_pb2 as pb
from sidecar._proto import dedup_pb2_grpc as pb_grpc
from sidecar.api.security import read_tokens
from sidecar.errors import SidecarError

COMMANDS = ("status", "key")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dedup-sidecar", description="Ask a running sidecar.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="the sidecar's settings file (for server.listen and the token)")
    common.add_argument("--target", help="HOST:PORT or unix:///path of the sidecar (default: server.listen)")
    common.add_argument(
        "--token", help="bearer token (default: server.auth_token, else the first in server.auth_token_file)"
    )
    common.add_argument("--tls-ca-file", help="dial with TLS, trusting this CA (PEM)")
    common.add_argument("--tls-cert-file", help="client certificate for mTLS (PEM)")
    common.add_argument("--tls-key-file", help="client key for mTLS (PEM)")
    common.add_argument("--json", action="store_true", help="print JSON")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "status",
        parents=[common],
        help="partitions, offsets, lag (or queue mode's share state), streams, readiness",
    )
    key = sub.add_parser("key", parents=[common], help="an idempotency key's state in the dedup store")
    key.add_argument("topic", help="the topic it is consumed from")
    key.add_argument("idempotency_key")
    return p


def _target_and_token(a: argparse.Namespace) -> tuple[str, str | None]:
    target, token = a.target, a.token
    if target is None or token is None:
        s = config.load(a.config)
        if target is None and config.is_unix_listen(s.server.listen):
            target = f"unix:{config.unix_socket_path(s.server.listen)}"
        elif target is None:
            host, port = config.split_listen(s.server.listen, "server.listen")
            host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # a wildcard: dial loopback
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if token is None and s.server.auth_token is not None:
            token = s.server.auth_token.get_secret_value()
        elif token is None and s.server.auth_token_file is not None:
            tokens = read_tokens(s.server.auth_token_file, "server.auth_token_file")
            token = tokens[0].decode() if tokens else None
    return target, token


def _channel(a: argparse.Namespace, target: str) -> grpc.Channel:
    if a.tls_ca_file is None and a.tls_cert_file is None:
        return grpc.insecure_channel(target)
    blobs = []
    for path in (a.tls_ca_file, a.tls_key_file, a.tls_cert_file):
        blobs.append(Path(path).read_bytes() if path else None)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(*blobs))


def _when(ms: int) -> str:
    return (
        datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ms else "-"
    )


def _print_status(r: pb.StatusResponse) -> None:
    ready = "ready" if r.ready else "NOT ready"
    print(f"sidecar {r.owner}: {ready}; group {r.group_id or '-'}; store {r.store}")
    if r.missing_topics:
        print(f"topics that do not exist: {', '.join(r.missing_topics)}")
    header = ("topic", "partition", "committed", "committable", "unsettled", "in flight", "lag", "paused")
    rows: list[tuple[str, ...]] = [(*header, "ordering")]
    for p in r.partitions:
        lag = str(p.lag) if p.lag >= 0 else "-"
        numbers = (p.partition, p.committed, p.committable, p.unsettled, p.in_flight)
        rows.append((p.topic, *map(str, numbers), lag, "yes" if p.paused else "no", p.ordering))
    if r.HasField("share"):
        _print_share(r.share)
    elif len(rows) == 1:
        print("no partitions assigned")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"{len(r.streams)} stream(s)")
    for s in r.streams:
        print(f"  #{s.id}: {','.join(s.topics) or 'all topics'}, {s.in_flight} in flight, {s.ordering}")


def _print_share(sh: pb.ShareStatus) -> None:
    """Queue mode: the member's share-group state in place of partitions and commits."""
    joined = "joined" if sh.joined else "not joined (no app stream attached)"
    print(
        f"queue mode (share group): {joined}; record lock {sh.lock_ms} ms, "
        f"delivery count limit {sh.delivery_count_limit}"
    )
    states = ", ".join(f"{n} {k}" for k, n in sorted(sh.held_by_state.items())) or "none"
    print(f"held: {sh.held} ({states})")
    counts = ", ".join(f"{k}: {n}" for k, n in sorted(sh.delivery_counts.items(), key=lambda kv: int(kv[0])))
    if counts:
        print(f"delivery counts of those held: {counts}")
    print(
        f"acquired {sh.acquired}; accepted {sh.accepted}, released {sh.released}, "
        f"rejected {sh.rejected}; refused by the broker {sh.refused}"
    )


def _print_key(a: argparse.Namespace, r: pb.GetKeyResponse) -> None:
    state = pb.KeyState.Name(r.state).removeprefix("KEY_STATE_").lower()
    line = f"{a.topic} / {a.idempotency_key}: {state}"
    failed = f" ({r.failures} failed)" if r.failures else ""
    if r.state == pb.KEY_STATE_CLAIMED:
        line += f" by {r.owner} until {_when(r.lease_until_ms)}, attempt {r.attempt}{failed}"
    elif r.state in (pb.KEY_STATE_DONE, pb.KEY_STATE_RELEASED):
        line += f" (by {r.owner}, attempt {r.attempt}{failed}, kept until {_when(r.expires_ms)})"
    print(line)
    if r.HasField("published"):
        p = r.published
        print(f"published: {p.topic}[{p.partition}]@{p.offset}")


def admin_main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    try:
        target, token = _target_and_token(a)
        channel = _channel(a, target)
    except SidecarError as exc:
        print(f"dedup-sidecar: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dedup-sidecar: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    asked = target
    try:
        with channel:
            stub = pb_grpc.AdminServiceStub(channel)
            if a.command == "status":
                answers: list[Any] = []
                for asked in _worker_targets(channel, target, metadata, a.timeout):
                    with _channel(a, asked) if asked != target else contextlib.nullcontext(channel) as ch:
                        worker = pb_grpc.AdminServiceStub(ch)
                        answers.append(
                            worker.Status(pb.StatusRequest(), metadata=metadata, timeout=a.timeout)
                        )
            else:
                req = pb.GetKeyRequest(topic=a.topic, idempotency_key=a.idempotency_key)
                answers = [stub.GetKey(req, metadata=metadata, timeout=a.timeout)]
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        print(f"dedup-sidecar: {asked} answered {code.name}: {details}", file=sys.stderr)
        return 1
    if a.json:
        dicts = [MessageToDict(x, preserving_proto_field_name=True) for x in answers]
        print(json.dumps(dicts[0] if len(dicts) == 1 else {"workers": dicts}, indent=2, sort_keys=True))
    elif a.command == "status":
        for i, answer in enumerate(answers):
            if len(answers) > 1:
                print(f"{'' if i == 0 else chr(10)}worker {i} of {len(answers)}:")
            _print_status(answer)
    else:
        _print_key(a, answers[0])
    return 0


def _worker_targets(channel: grpc.Channel, target: str, metadata: Any, timeout: float) -> list[str]:
    """Where each worker of the sidecar at ``target`` listens (server.workers); just ``target``
    for a sidecar of one worker, or one without ListWorkers."""
    try:
        listed = pb_grpc.DedupServiceStub(channel).ListWorkers(
            pb.ListWorkersRequest(), metadata=metadata, timeout=timeout
        )
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return [target]
        raise
    if len(listed.workers) <= 1:
        return [target]
    host = target.rpartition(":")[0]
    return [
        target
        if w.index == listed.this_worker
        else f"unix:{w.unix_socket}"
        if w.unix_socket
        else f"{host}:{w.port}"
        for w in listed.workers
    ]
