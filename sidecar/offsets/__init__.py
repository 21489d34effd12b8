"""Per-partition offset tracking: which offsets are settled, what to commit, and the commit
metadata's encoding. Pure logic: no I/O, no Kafka, no gRPC, and no import of the rest of the
sidecar. The tracker is compiled with mypyc with the engine."""

from sidecar.offsets.metadata import decode_settled, encode_settled
from sidecar.offsets.tracker import AckTracker, OfferResult

__all__ = ["AckTracker", "OfferResult", "decode_settled", "encode_settled"]
