from collections.abc import Sequence

from sidecar.engine.records import Pending

def encode_frame(batch: Sequence[Pending], deadline_ms: int, /) -> bytes: ...
