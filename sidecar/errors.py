"""One error hierarchy for the sidecar. sidecar/api/errors.py maps it to gRPC status codes."""

from __future__ import annotations


class SidecarError(Exception):
    """Base class. ``retriable`` tells a client whether the same call may succeed later."""

    retriable = False


class ConfigError(SidecarError):
    """The configuration is invalid or unsafe; the message names the setting to change."""


class InvalidArgument(SidecarError):
    pass


class NotFound(SidecarError):
    pass


class PermissionDenied(SidecarError):
    pass


class FailedPrecondition(SidecarError):
    """The call cannot work with this sidecar's configuration; the message names the setting."""


class ResourceExhausted(SidecarError):
    retriable = True


class AlreadyExists(SidecarError):
    """An idempotency key was reused with a different payload."""


class Unauthenticated(SidecarError):
    pass


class Unavailable(SidecarError):
    retriable = True


class StoreUnavailable(Unavailable):
    """The dedup store cannot be reached; nothing was applied."""


class KafkaUnavailable(Unavailable):
    pass


class ShuttingDown(Unavailable):
    pass


class PublishIndeterminate(SidecarError):
    """Kafka did not confirm in time; the record may or may not be persisted. Retry with the same key."""

    retriable = True
