"""Typed errors of the runtime, mapped to HTTP statuses in one place (the app's handlers)."""

from __future__ import annotations

from avatar_contracts.errors import (  # noqa: F401  (re-exported for the runtime's modules)
    BadMedia,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
    ValidationFailed,
)


class Unauthorized(ServiceError):
    """No API key, or an unknown one, while RUNTIME_API_KEYS is set."""

    status_code = 401
    error_type = "unauthorized"


class Conflict(ServiceError):
    """An Idempotency-Key reused with a different body, or an output asked for before it exists."""

    status_code = 409
    error_type = "conflict"


class StoreUnavailable(ServiceError):
    """The output store (S3) cannot be reached or used right now; a job retries, a download answers 503."""

    status_code = 503
    error_type = "output_store_unavailable"


class GPUServiceError(Exception):
    """A GPU-service call that did not succeed; `transient` says whether retrying can help, `down` whether the
    service itself failed (unreachable, timed out, 5xx), so that another GPU service may do the work instead."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None,
                 error_type: str = "gpu_service_error", retry_after_s: float | None = None,
                 down: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.status = status
        self.error_type = error_type
        self.retry_after_s = retry_after_s
        self.down = down


class JobInputError(Exception):
    """The job's inputs cannot be generated (the GPU service answered 4xx): fail now, never retry."""

    def __init__(self, message: str, error_type: str = "invalid_input") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
