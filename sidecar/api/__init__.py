"""The gRPC face of the sidecar: the servicer and the stream RPCs, the one error-to-status
mapping, server assembly, listeners, token auth and TLS, the admin service, the frame encoder.

It turns requests into calls on the engine and the publisher and their answers into responses;
it holds no delivery state of its own. It must not import ``process`` (the composition root
hands it what it needs) nor reach past the engine into ``kafka``.
"""
