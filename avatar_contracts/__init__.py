"""Shared, versioned request/response models of the GPU service.

The GPU service, the runtime's client and the evaluator all import these models, so a
change to the wire format is made once, here, and bumps ``CONTRACT_VERSION``.
"""

from avatar_contracts.gpu import (
    CONTRACT_VERSION,
    Capabilities,
    EngineInfo,
    ErrorResponse,
    HealthResponse,
    ModelsStatus,
    PhonemeTiming,
    TTSRequest,
    TTSResponse,
)

__all__ = [
    "CONTRACT_VERSION",
    "Capabilities",
    "EngineInfo",
    "ErrorResponse",
    "HealthResponse",
    "ModelsStatus",
    "PhonemeTiming",
    "TTSRequest",
    "TTSResponse",
]
