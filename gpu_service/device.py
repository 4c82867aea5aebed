"""Device selection, done once at start: CUDA, else MPS, else CPU."""

from __future__ import annotations

from dataclasses import dataclass

from gpu_service.errors import ConfigurationError


@dataclass(frozen=True)
class DeviceInfo:
    """The device the service runs on and the accelerators it saw."""

    name: str
    cuda: bool
    mps: bool
    detail: str


def probe() -> tuple[bool, bool, str]:
    """Report (cuda, mps, description) without choosing anything."""
    try:
        import torch
    except ImportError:
        return False, False, "torch not installed"
    cuda = bool(torch.cuda.is_available())
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    detail = torch.cuda.get_device_name(0) if cuda else ("Apple MPS" if mps else "CPU")
    return cuda, mps, f"torch {torch.__version__}, {detail}"


def resolve_device(requested: str) -> DeviceInfo:
    """Pick the device for `requested` (auto|cuda|mps|cpu) or fail with what to do."""
    cuda, mps, detail = probe()
    if requested == "auto":
        name = "cuda" if cuda else ("mps" if mps else "cpu")
    elif requested == "cuda" and not cuda:
        raise ConfigurationError(
            "DEVICE=cuda was requested but no CUDA device is visible to torch "
            f"({detail}). Install a CUDA build of torch and the NVIDIA driver, or set DEVICE=auto."
        )
    elif requested == "mps" and not mps:
        raise ConfigurationError(
            f"DEVICE=mps was requested but Apple MPS is not available ({detail}). "
            "MPS needs Apple silicon and macOS 12.3+; set DEVICE=auto or DEVICE=cpu."
        )
    elif requested in ("cuda", "mps", "cpu"):
        name = requested
    else:
        raise ConfigurationError(f"DEVICE must be one of auto, cuda, mps, cpu; got {requested!r}.")
    return DeviceInfo(name=name, cuda=cuda, mps=mps, detail=detail)
