"""Typed errors of the GPU service, mapped to HTTP statuses in one table.

The shared taxonomy (ServiceError, ValidationFailed, BadMedia, NotFound, PayloadTooLarge,
UnsupportedMediaType) lives in avatar_contracts.errors; the GPU service's own errors follow.
"""

from __future__ import annotations

from avatar_contracts.errors import (  # noqa: F401  (re-exported for the service's modules)
    BadMedia,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
    ValidationFailed,
)


class EngineUnavailable(ServiceError):
    """The named engine is configured but cannot run (weights missing, failed to load).

    A 4xx: the request asks for something this deployment does not have; the message says
    how to provide it. The service itself stays healthy.
    """

    status_code = 422
    error_type = "engine_unavailable"


class Overloaded(ServiceError):
    """Every slot is busy and the wait queue is full."""

    status_code = 429
    error_type = "overloaded"


class NotReady(ServiceError):
    """Engines are still loading."""

    status_code = 503
    error_type = "not_ready"


class DeviceOutOfMemory(ServiceError):
    """The device ran out of memory even for the smallest unit of work (one frame), after its cache was emptied.

    A 503 with Retry-After: the memory is taken by other work now, so the same request may fit later
    or on another GPU service.
    """

    status_code = 503
    error_type = "out_of_memory"


class GenerationFailed(ServiceError):
    """The engine ran and failed on this input (an encoder error, no audio for the text).

    424, as TGI answers a failed generation: the same request would fail the same way, so a
    client must not retry it as it retries a 5xx (the runtime fails the job at once).
    """

    logged = True
    """Logged with the request id like a 5xx: the service could not do what it should have."""

    status_code = 424
    error_type = "generation_failed"


class ConfigurationError(RuntimeError):
    """The service cannot start as configured; the message says how to fix it."""
