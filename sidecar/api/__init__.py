"""The gRPC face of the sidecar: servicer, error mapping, server assembly."""
