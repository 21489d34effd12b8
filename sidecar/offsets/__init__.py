"""Per-partition offset tracking. Pure logic: no I/O, no Kafka, no gRPC."""

from sidecar.offsets.metadata import decode_settled, encode_settled
from sidecar.offsets.tracker import AckTracker, OfferResult

__all__ = ["AckTracker", "OfferResult", "decode_settled", "encode_settled"]
