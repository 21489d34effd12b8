"""Observability: what the sidecar tells its operator.

- ``metrics``: the Prometheus metrics, with their names and labels in one place.
- ``worker_metrics``: the metrics of ``server.workers`` processes, gathered by the supervisor.
- ``logs``: the log format (text or JSON) and its setup.
- ``tracing``: OpenTelemetry spans, carried in record headers.
- ``outage``: a failing dependency logged by its changes of state, and counted.

Every other package may import these modules; they import nothing of the sidecar but
``errors``: never the engine, the API, the Kafka or store packages, or the process.
"""
