"""The delivery engine: intake, dedup decisions, dispatch to app streams, acks and commits."""
