"""A consume-transform-produce app, run as its own process so a test can kill -9 it.

For each input it publishes two outputs whose idempotency keys derive from the input's key,
sleeps a little (the "work"), then acks the input. Killed between publishing and acking, its
inputs are redelivered and republished with the same keys, which Publish turns into duplicates
that write nothing.

Usage: python -m tests.integration.apps.transform_app SIDECAR OUTPUT_TOPIC
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from dedup_client import DedupClient, derive_key


async def main(target: str, output: str) -> None:
    # CRASH_AFTER=N: SIGKILL ourselves after publishing the outputs of the N-th input, before its
    # ack: the exact moment the inbox-less window is about.
    crash_after = int(os.environ.get("CRASH_AFTER", "0"))
    seen = 0
    async with DedupClient(target) as client:
        async for msg in client.subscribe(max_in_flight=20):
            seen += 1
            for i in range(2):
                r = await client.publish(
                    output, msg.value + b"/%d" % i, idempotency_key=derive_key(msg.idempotency_key, i)
                )
                if r.duplicate:
                    print(f"duplicate {r.idempotency_key} attempt={msg.attempt}", flush=True)
            if seen == crash_after:
                os.kill(os.getpid(), signal.SIGKILL)
            await asyncio.sleep(0.01)
            await msg.ack()
            print(f"acked {msg.idempotency_key}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
