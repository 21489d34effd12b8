"""Python client for the Kafka dedup sidecar.

Example::

    async with DedupClient("127.0.0.1:50051") as client:
        await client.publish("orders", b"{...}", idempotency_key="order-42")
        async for msg in client.subscribe(["orders"]):
            apply(msg.value)
            await msg.ack()          # coalesced with other acks into one Ack call

The modules: ``client`` (``DedupClient``), ``messages`` (``Message``), ``workers`` (a sidecar of
several worker processes), ``streams`` (the stream RPCs), ``gather`` (concurrent acks and
publishes in one call), ``results`` (what calls answer), ``inbox`` (an SQLite inbox for apps
that apply effects locally). It speaks only the proto
(``_proto``, generated) and must never import the sidecar: apps install it alone.
"""

from dedup_client.client import DedupClient
from dedup_client.inbox import SQLiteInbox
from dedup_client.messages import Message
from dedup_client.results import AckError, AckResult, PublishError, PublishResult, derive_key

__all__ = [
    "AckError",
    "AckResult",
    "DedupClient",
    "Message",
    "PublishError",
    "PublishResult",
    "SQLiteInbox",
    "derive_key",
]
