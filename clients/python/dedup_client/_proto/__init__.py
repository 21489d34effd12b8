"""Generated protobuf and gRPC stubs for dedup/v1/dedup.proto."""
