"""kafka-dedup-sidecar: exactly-once effects from Kafka for apps in any language, over gRPC."""

__version__ = "0.1.0"
