"""The soak: sidecars under steady load for a long time, a fault every few minutes.

Two consumer groups (the naive and the inbox app, as in the fault rows), two sidecar+app pairs
each, on a real broker and a real Redis. Records arrive at a steady rate through PublishBatch the
whole time. Every ``interval`` seconds one fault from the fault harness's list hits, in turn (a
sidecar kill -9'd and restarted, one stopped with SIGTERM and restarted, an app kill -9'd and
restarted, Redis paused, the broker paused). Every ``sample`` seconds each sidecar process's
resident memory, open files and threads, and the store's key count, are written down. At the end
the ledgers are checked as the fault rows check them.

    python -m tests.chaos.soak --duration 3600 [--out docs/RELIABILITY.md] [--keep DIR]

(scripts/soak.sh DURATION). With ``--out``, the results replace the soak section of that file
(from its ``<!-- soak -->`` line on) and the plot is written next to it as ``soak.svg``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "local"))  # deploy/local/services, as in tests/conftest.py

import services  # noqa: E402

from tests.chaos.harness import VARIANTS, Figures, Scenario  # noqa: E402

#: Where docs/RELIABILITY.md's soak section begins (tests/chaos/report.py keeps it).
MARKER = "<!-- soak -->"


@dataclass
class Sample:
    t: float  # seconds since the soak began
    member: str  # "naive-0", ...
    pid: int
    rss_mb: float
    files: int
    threads: int


@dataclass
class SoakResult:
    duration_s: float
    rate: int
    interval_s: float
    faults: list[tuple[float, str]] = field(default_factory=list)  # (t, what)
    samples: list[Sample] = field(default_factory=list)
    store_keys: list[tuple[float, int]] = field(default_factory=list)
    figures: list[Figures] = field(default_factory=list)
    drain_note: str = ""


def proc_stats(pid: int) -> tuple[float, int, int] | None:
    """(resident MB, open files, threads) of a live process, from /proc; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        files = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields.get("VmRSS", "0 kB").split()[0])
    return rss_kb / 1024, files, int(fields.get("Threads", "0").strip())


Fault = Callable[[Scenario, int], Awaitable[str]]


async def kill_sidecar(s: Scenario, turn: int) -> str:
    m = s.member(VARIANTS[turn % 2], turn % 2)
    m.sidecar.kill9()
    await asyncio.sleep(0.5)
    await s.restart_sidecar(m)
    return f"kill -9 of sidecar {m.variant}-{turn % 2}, restarted"


async def term_sidecar(s: Scenario, turn: int) -> str:
    m = s.member(VARIANTS[turn % 2], (turn + 1) % 2)
    t0 = time.monotonic()
    await asyncio.to_thread(m.sidecar.terminate, 60)
    took = time.monotonic() - t0
    await s.restart_sidecar(m)
    return f"SIGTERM of sidecar {m.variant}-{(turn + 1) % 2} (stopped in {took:.1f} s), restarted"


async def kill_app(s: Scenario, turn: int) -> str:
    m = s.member(VARIANTS[turn % 2], turn % 2)
    m.kill_app()
    await asyncio.sleep(0.3)
    m.start_app()
    return f"kill -9 of app {m.variant}-{turn % 2}, restarted"


async def _paused(server: services.RedisServer | services.KafkaBroker, seconds: float, what: str) -> str:
    server.pause()
    await asyncio.sleep(seconds)
    server.resume()
    return f"{what} SIGSTOPped {seconds:g} s"


async def pause_redis(s: Scenario, turn: int) -> str:
    assert isinstance(s.redis, services.RedisServer)
    return await _paused(s.redis, 4, "redis-server")


async def pause_broker(s: Scenario, turn: int) -> str:
    assert isinstance(s.kafka, services.KafkaBroker)
    return await _paused(s.kafka, 5, "Kafka broker")


FAULTS: list[Fault] = [kill_sidecar, term_sidecar, kill_app, pause_redis, pause_broker]


async def sample_loop(s: Scenario, result: SoakResult, began: float, every: float) -> None:
    assert isinstance(s.redis, services.RedisServer)
    while True:
        t = time.monotonic() - began
        for v in VARIANTS:
            for i, m in enumerate(s.groups[v]):
                proc = m.sidecar.proc
                stats = proc_stats(proc.pid) if proc is not None and proc.poll() is None else None
                if stats is not None and proc is not None:
                    result.samples.append(Sample(t, f"{v}-{i}", proc.pid, *stats))
        with contextlib.suppress(RuntimeError, OSError):
            result.store_keys.append((t, int(await asyncio.to_thread(s.redis.cli, "DBSIZE"))))
        await asyncio.sleep(every)


async def soak(
    duration_s: float,
    workdir: Path,
    kafka: services.KafkaBroker,
    redis: services.RedisServer,
    interval_s: float | None = None,
    sample_s: float | None = None,
    rate: int = 200,
    progress: Callable[[str], None] = lambda _: None,
) -> SoakResult:
    """Run the soak on ``kafka`` and ``redis`` (which it pauses) and return what it saw."""
    interval = interval_s or (300.0 if duration_s >= 1800 else max(10.0, duration_s / 5))
    every = sample_s or (30.0 if duration_s >= 1800 else 5.0)
    result = SoakResult(duration_s, rate, interval)
    s = Scenario("SOAK", kafka, redis, workdir, 0)
    try:
        await s.start()
        began = time.monotonic()
        arriving = asyncio.create_task(s.trickle(0, per_second=rate))
        sampling = asyncio.create_task(sample_loop(s, result, began, every))
        turn = 0
        try:
            # Fault k at k * interval (not after the last one ended: faults take time), none in
            # the last seconds: the end measures recovery, not a fault.
            while (at := (turn + 1) * interval) <= duration_s - 5:
                await asyncio.sleep(max(0.0, began + at - time.monotonic()))
                fault = FAULTS[turn % len(FAULTS)]
                what = await fault(s, turn // len(FAULTS))
                t = time.monotonic() - began
                result.faults.append((t, what))
                progress(f"{t / 60:5.1f} min: {what}; {len(s.sent)} records published so far")
                turn += 1
            await asyncio.sleep(max(0.0, began + duration_s - time.monotonic()))
        finally:
            for task in (arriving, sampling):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        progress(f"load stopped after {(time.monotonic() - began) / 60:.1f} min; draining")
        s.heal_at = time.time()
        result.drain_note = await s.drain()
        result.figures = s.check()
        return result
    finally:
        s.stop()


def growth(result: SoakResult) -> dict[str, tuple[float, float, int, int, int, int]]:
    """Per sidecar process that lived at least a third of the soak: (first RSS, last RSS, first
    and last open files, first and last threads), from its second sample on (start-up done)."""
    by_pid: dict[int, list[Sample]] = {}
    for x in result.samples:
        by_pid.setdefault(x.pid, []).append(x)
    out = {}
    for pid, xs in by_pid.items():
        if len(xs) < 3 or xs[-1].t - xs[1].t < result.duration_s / 3:
            continue
        a, b = xs[1], xs[-1]
        out[f"{b.member} (pid {pid}, {(b.t - a.t) / 60:.0f} min)"] = (
            a.rss_mb,
            b.rss_mb,
            a.files,
            b.files,
            a.threads,
            b.threads,
        )
    return out


def svg(result: SoakResult) -> str:
    """Two stacked charts: resident memory per sidecar member, and the store's key count."""
    width, height, pad = 760, 220, 50
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    t_max = max(result.duration_s, 1.0)

    def chart(y0: int, title: str, series: dict[str, list[tuple[float, float]]], unit: str) -> list[str]:
        top = max((y for pts in series.values() for _, y in pts), default=1.0) * 1.1 or 1.0
        out = [
            f'<text x="{pad}" y="{y0 + 16}" font-size="14">{title}</text>',
            f'<line x1="{pad}" y1="{y0 + height}" x2="{width - 10}" y2="{y0 + height}" stroke="#888"/>',
            f'<line x1="{pad}" y1="{y0 + 24}" x2="{pad}" y2="{y0 + height}" stroke="#888"/>',
            f'<text x="4" y="{y0 + 30}" font-size="11">{top:,.0f} {unit}</text>',
            f'<text x="4" y="{y0 + height}" font-size="11">0</text>',
            f'<text x="{width - 60}" y="{y0 + height + 14}" font-size="11">{t_max / 60:.0f} min</text>',
        ]
        for t, _ in result.faults:
            x = pad + (width - pad - 10) * t / t_max
            out.append(f'<line x1="{x:.1f}" y1="{y0 + 24}" x2="{x:.1f}" y2="{y0 + height}" stroke="#ddd"/>')
        for k, (name, pts) in enumerate(sorted(series.items())):
            xy = " ".join(
                f"{pad + (width - pad - 10) * t / t_max:.1f},{y0 + height - (height - 24) * y / top:.1f}"
                for t, y in pts
            )
            color = colors[k % len(colors)]
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{xy}"/>')
            out.append(
                f'<text x="{width - 150}" y="{y0 + 36 + 13 * k}" font-size="11" fill="{color}">{name}</text>'
            )
        return out

    rss: dict[str, list[tuple[float, float]]] = {}
    for x in result.samples:
        rss.setdefault(x.member, []).append((x.t, x.rss_mb))
    keys = {"store keys": [(t, float(n)) for t, n in result.store_keys]}
    body = [
        *chart(0, "Resident memory per sidecar (MB); grey lines: faults", rss, "MB"),
        *chart(height + 30, "Keys in the store", keys, ""),
    ]
    total = 2 * height + 50
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total}" '
        f'viewBox="0 0 {width} {total}" font-family="sans-serif">\n'
        '<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n"
    )


def section(result: SoakResult, command: str, code: str) -> str:
    """The soak section of docs/RELIABILITY.md."""
    lines = [
        MARKER,
        "## Soak",
        "",
        f"Generated by `{command}`: {result.duration_s / 60:.0f} minutes on one broker and one Redis, "
        f"two sidecar+app pairs per group (naive and inbox apps), {result.rate} records a second "
        f"published throughout, a fault every {result.interval_s:.0f} s in turn: a sidecar "
        "kill -9'd, one stopped with SIGTERM, an app kill -9'd (each restarted at once), Redis paused "
        f"4 s, the broker paused 5 s. {code}",
        "",
        "| app | sent | lost | duplicated | unexpected | delivered after OK ack | redelivered keys "
        "| max attempt |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in result.figures:
        lines.append(
            f"| {f.variant} | {f.sent} | {f.lost} | {f.duplicated} | {f.unexpected} | "
            f"{f.delivered_after_ack} | {f.redelivered} | {f.max_attempt} |"
        )
    if result.drain_note:
        lines += ["", f"Drain: {result.drain_note}."]
    lines += [
        "",
        "Sidecar processes that lived through at least a third of the soak, from their second sample "
        "(start-up done) to their last:",
        "",
        "| process | resident MB | open files | threads |",
        "| --- | --- | --- | --- |",
    ]
    for name, (r0, r1, f0, f1, t0, t1) in sorted(growth(result).items()):
        lines.append(f"| {name} | {r0:.0f} → {r1:.0f} | {f0} → {f1} | {t0} → {t1} |")
    longest = _longest_lived(result)
    if longest:
        lines += [
            "",
            f"The longest-lived process ({longest[0].member}, pid {longest[0].pid}) over the last third "
            f"of its life: {longest[1].rss_mb:.0f} → {longest[-1].rss_mb:.0f} MB resident, "
            f"{longest[1].files} → {longest[-1].files} open files, {longest[1].threads} → "
            f"{longest[-1].threads} threads.",
        ]
    keys = result.store_keys
    if keys:
        sent = max((f.sent for f in result.figures), default=0)
        lines += [
            "",
            f"Store keys: {keys[0][1]:,} → {keys[-1][1]:,} "
            f"({keys[-1][1] / max(sent, 1):.2f} per record sent: "
            "each record leaves its two groups' done marks and its publish record, kept for "
            "`store.retention_seconds`).",
        ]
    lines += ["", "![Soak: memory per sidecar and store keys over time](soak.svg)", "", "Faults:", ""]
    lines += [f"- {t / 60:.1f} min: {what}" for t, what in result.faults]
    return "\n".join(lines) + "\n"


def _longest_lived(result: SoakResult) -> list[Sample]:
    """The samples of the process sampled longest: its first, the one at two thirds of its life,
    and its last ([] without one sampled three times)."""
    by_pid: dict[int, list[Sample]] = {}
    for x in result.samples:
        by_pid.setdefault(x.pid, []).append(x)
    xs = max(by_pid.values(), key=lambda v: v[-1].t - v[0].t, default=[])
    if len(xs) < 3:
        return []
    cut = xs[0].t + (xs[-1].t - xs[0].t) * 2 / 3
    return [xs[0], next(x for x in xs if x.t >= cut), xs[-1]]


def contract_breaches(result: SoakResult) -> list[str]:
    """What the fault rows would fail on."""
    bad = []
    for f in result.figures:
        if f.lost or f.unexpected or f.delivered_after_ack or (f.variant == "inbox" and f.duplicated):
            bad.append(f"{f.variant}: {f.row()}")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, required=True, help="seconds of load")
    ap.add_argument("--interval", type=float, help="seconds between faults (default: 5 min, or a fifth)")
    ap.add_argument("--rate", type=int, default=200, help="records published a second")
    ap.add_argument("--out", type=Path, help="write the soak section into this file (and soak.svg)")
    ap.add_argument("--keep", type=Path, help="run in this (new) directory and keep every log")
    ap.add_argument("--command", default="scripts/soak.sh", help="how the report says it was made")
    a = ap.parse_args()

    from tests.chaos.report import code_line  # not at the top: report imports the fault suite

    def say(line: str) -> None:
        print(f"[soak] {line}", flush=True)

    code = code_line()
    with contextlib.ExitStack() as stack:
        if a.keep:
            a.keep.mkdir(parents=True)
            work = a.keep
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dedup-soak-")))
        kafka = stack.enter_context(services.KafkaBroker.start(work / "kafka"))
        redis = stack.enter_context(services.RedisServer.start(work / "redis", appendonly="everysec"))
        say(f"{a.duration / 60:.1f} min of load at {a.rate} records/s on {kafka.bootstrap_servers}")
        result = asyncio.run(soak(a.duration, work, kafka, redis, a.interval, rate=a.rate, progress=say))
    for f in result.figures:
        say(f"{f.variant}: {f.row()}")
    for name, (r0, r1, f0, f1, t0, t1) in sorted(growth(result).items()):
        say(f"{name}: {r0:.0f} -> {r1:.0f} MB, {f0} -> {f1} files, {t0} -> {t1} threads")
    if a.out:
        text = a.out.read_text() if a.out.exists() else ""
        head = text.split(MARKER, 1)[0].rstrip("\n")
        a.out.write_text((head + "\n\n" if head else "") + section(result, a.command, code))
        (a.out.parent / "soak.svg").write_text(svg(result))
        say(f"wrote {a.out} and {a.out.parent / 'soak.svg'}")
    bad = contract_breaches(result)
    for line in bad:
        say(f"BREACH {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
