"""Idempotent Publish: the same idempotency key gives the same result."""
