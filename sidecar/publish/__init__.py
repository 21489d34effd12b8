"""Idempotent Publish: the same idempotency key gives the same result.

It claims the key in the store, produces through the Kafka producer and records the outcome.
It must not import ``api`` or ``process``; the engine's reroute shares its producer, not the
other way round.
"""
