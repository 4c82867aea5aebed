"""Device selection, done once at start: CUDA, else MPS, else CPU; every visible CUDA device, or the DEVICES list.

A device has a name (`cuda`, `cuda:1`, `mps`, `cpu`, `cpu:1`) and a kind (`cuda`, `mps`, `cpu`).
Engines get the name; `torch_device` turns it into what torch places tensors on (every `cpu:N`
is torch's one CPU, so several CPU "devices" are replicas that share the host: for testing
placement without a GPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from gpu_service.errors import ConfigurationError

KINDS = ("cuda", "mps", "cpu")
_NAME = re.compile(r"^(cuda|mps|cpu)(?::(\d{1,3}))?$")


@dataclass(frozen=True)
class DeviceInfo:
    """The devices the service runs on and the accelerators it saw."""

    name: str
    """Their kind (cpu, cuda or mps): what /health reports as `device`."""
    cuda: bool
    mps: bool
    detail: str
    devices: tuple[str, ...] = ()
    """Every device engines run on, by name; the first holds the engines that run once (Piper)."""

    def __post_init__(self) -> None:
        if not self.devices:
            object.__setattr__(self, "devices", (self.name,))


def device_kind(name: str) -> str:
    """`cuda:1` -> `cuda`, `cpu:0` -> `cpu`, `mps` -> `mps`."""
    return name.split(":", 1)[0]


def torch_device(name: str) -> str:
    """What torch places tensors on for a device name: `cpu:N` is torch's one `cpu`."""
    return "cpu" if device_kind(name) == "cpu" else name


def parse_devices(text: str) -> Optional[list[str]]:
    """`auto` -> None; `cuda:0,cuda:1` or `cpu,cpu` -> device names, bare repeated CPUs numbered; ValueError naming a bad item.

    Checks the spelling only; whether the devices exist is resolve_device's business.
    """
    items = [item.strip().lower() for item in str(text).split(",") if item.strip()]
    if not items or items == ["auto"]:
        return None
    names: list[str] = []
    for item in items:
        m = _NAME.match(item)
        if m is None:
            raise ValueError(f"{item!r} is not a device; use auto, or a list of cuda:N, mps, cpu or cpu:N")
        if m.group(1) == "mps" and m.group(2) not in (None, "0"):
            raise ValueError(f"{item!r}: there is only one MPS device (mps)")
        names.append(item)
    if len({device_kind(n) for n in names}) > 1:
        raise ValueError(f"devices must all be of one kind, got {','.join(names)}")
    if len(names) > 1:
        # `cpu,cpu` asks for two CPU replicas: number them so each has a name of its own; a bare `cuda` is cuda:0.
        names = [f"cpu:{i}" if n == "cpu" else ("cuda:0" if n == "cuda" else n) for i, n in enumerate(names)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{', '.join(dupes)} listed more than once; ENGINE_SLOTS sets the concurrency on one device")
    return names


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


def cuda_count() -> int:
    """CUDA devices visible to torch (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def resolve_device(requested: str, devices: str = "auto") -> DeviceInfo:
    """Pick the devices for DEVICE=`requested` (auto|cuda|mps|cpu) and DEVICES=`devices`, or fail with what to do.

    DEVICES=auto takes every visible CUDA device (named `cuda` when there is one, as before), else
    MPS, else the CPU; a forced DEVICE sets the kind. A DEVICES list names the devices itself.
    """
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
    elif requested in KINDS:
        name = requested
    else:
        raise ConfigurationError(f"DEVICE must be one of auto, cuda, mps, cpu; got {requested!r}.")
    try:
        listed = parse_devices(devices)
    except ValueError as exc:
        raise ConfigurationError(f"DEVICES: {exc}") from None
    if listed is None:
        count = cuda_count() if name == "cuda" else 0
        names = tuple(f"cuda:{i}" for i in range(count)) if count > 1 else (name,)
        return DeviceInfo(name=name, cuda=cuda, mps=mps, detail=detail, devices=names)
    kind = device_kind(listed[0])
    if requested != "auto" and kind != requested:
        raise ConfigurationError(f"DEVICE={requested} but DEVICES={','.join(listed)}; set DEVICE=auto or list {requested} devices.")
    if kind == "cuda":
        count = cuda_count()
        missing = [n for n in listed if (int(n.split(":")[1]) if ":" in n else 0) >= count]
        if missing:
            raise ConfigurationError(
                f"DEVICES lists {', '.join(missing)} but torch sees {count} CUDA device(s) ({detail}); "
                "list cuda:0 .. cuda:N-1, or set DEVICES=auto."
            )
    elif kind == "mps" and not mps:
        raise ConfigurationError(f"DEVICES lists mps but Apple MPS is not available ({detail}); set DEVICES=auto.")
    return DeviceInfo(name=kind, cuda=cuda, mps=mps, detail=detail, devices=tuple(listed))
