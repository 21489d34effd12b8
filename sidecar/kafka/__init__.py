"""Adapters around confluent-kafka: a consumer owned by one poll thread, and an async producer."""
