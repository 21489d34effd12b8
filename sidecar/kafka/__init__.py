"""Adapters around confluent-kafka: a consumer owned by one poll thread, an async producer,
topic metadata, and the connection settings they share.

They speak Kafka and asyncio, not dedup: they must not import the engine, the store, the API
or the process.
"""
