"""Compare two builds of the sidecar on CPU per consumed and per published record.

Usage::

    python -m bench.tools.ab BEFORE AFTER [--rounds 6] [--records 200000]

BEFORE and AFTER are git revisions (a worktree of each is made under a temporary directory) or
paths to source trees. One broker and one Redis serve every run; the topic is preloaded once.
Each round runs BEFORE then AFTER (the order alternates every round, so neither always runs on
a warmer broker): the batched client consumes ``--records`` records, then ``PublishBatch`` sends
half as many. The sidecar process's CPU (user + system from /proc) per record is the figure: far
steadier than a rate on a shared machine. Prints each run and the medians, and what AFTER saves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, log, preload, services
from bench.scenarios.consume import sidecar_consume
from bench.scenarios.publish import sidecar_publish


def source_tree(rev: str, tmp: Path) -> Path:
    """A path to the sources of ``rev``: the path itself, or a fresh worktree of the revision
    with its compiled modules (where the revision has them) built in place."""
    if Path(rev).is_dir():
        return Path(rev).resolve()
    tree = tmp / f"tree-{len(list(tmp.glob('tree-*')))}"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True)
    # The compiled modules: setup.py's, or the frame encoder alone, declared in pyproject.toml
    # (read by setup() with no arguments), in the one revision that had it that way.
    if (tree / "setup.py").exists():
        script = ["setup.py"]
    elif list(tree.glob("sidecar/**/*.c")):
        script = ["-c", "from setuptools import setup; setup()"]
    else:
        return tree
    build = [sys.executable, *script, "-q", "build_ext", "--inplace"]
    subprocess.run(build, cwd=tree, check=True, capture_output=True)
    return tree


def check_imports_from(tree: Path, cwd: Path) -> None:
    """A sidecar started the way the benchmark starts one (bench/common.py SidecarProc), with
    PYTHONPATH at ``tree``, imports that tree's package (an earlier version of the harness ran
    the repository's own for both)."""
    code = "import sidecar; print(sidecar.__file__)"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    where = Path(out.stdout.strip()).resolve()
    if not where.is_relative_to(tree.resolve()):
        raise SystemExit(f"ab: a sidecar for {tree} would import {where or out.stderr}")
    log(f"{tree}: imports {where}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--records", type=int, default=200_000)
    args = ap.parse_args()
    n, n_pub = args.records, args.records // 2
    cpu: dict[str, dict[str, list[float]]] = {
        "before": {"consume": [], "publish": []},
        "after": {"consume": [], "publish": []},
    }
    with tempfile.TemporaryDirectory(prefix="dedup-ab-") as tmp_name:
        tmp = Path(tmp_name)
        trees = {"before": source_tree(args.before, tmp), "after": source_tree(args.after, tmp)}
        for tree in trees.values():
            check_imports_from(tree, tmp)
        try:
            with services.running(tmp / "services", quick_start=False) as (kafka, redis):
                log(f"preloading {n} records")
                preload(kafka, "ab6", 6, n, "ab")
                kafka.create_topic("abpub", 6)
                for i in range(-1, args.rounds):  # round -1 warms the broker's JIT up: not counted
                    order = ["before", "after"] if i % 2 == 0 else ["after", "before"]
                    for which in order:
                        # PYTHONPATH comes before the editable install's finder: this tree's sidecar runs.
                        store = {
                            "DEDUP_STORE__BACKEND": "redis",
                            "DEDUP_STORE__REDIS_URL": redis.url,
                            "PYTHONPATH": str(trees[which]),
                        }
                        c = sidecar_consume(kafka, "ab6", n, store, tmp, which)
                        p = sidecar_publish(kafka, "abpub", n_pub, store, tmp, 500)
                        if i >= 0:
                            cpu[which]["consume"].append(c.extra["cpu_us"])
                            cpu[which]["publish"].append(p.extra["cpu_us"])
                        label = f"round {i + 1}" if i >= 0 else "warm-up"
                        log(
                            f"{label} {which}: consume {c.extra['cpu_us']} µs ({c.rate:.0f}/s), "
                            f"PublishBatch {p.extra['cpu_us']} µs ({p.rate:.0f}/s)"
                        )
        finally:
            for tree in trees.values():
                if tree.is_relative_to(tmp):
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    summary = {
        path: {
            "before_median_us": statistics.median(cpu["before"][path]),
            "after_median_us": statistics.median(cpu["after"][path]),
            "saved": round(
                1 - statistics.median(cpu["after"][path]) / statistics.median(cpu["before"][path]), 3
            ),
            "before": cpu["before"][path],
            "after": cpu["after"][path],
        }
        for path in ("consume", "publish")
    }
    print(json.dumps({"before": args.before, "after": args.after, "at": time.ctime(), **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
