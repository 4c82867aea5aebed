"""Out-of-memory on an accelerator treated as a normal event: recognised, the allocator's cache emptied, counted.

A batched render that does not fit halves its batch and tries again (render_torch.py); each
halving is counted here per device and handed to every hook in RETRY_HOOKS, which is how the
metrics module sees them (it appends its `record_oom_retry`).
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)

RETRY_HOOKS: list[Callable[[str], None]] = []
"""Called with the device name on every halving after an out-of-memory error (e.g. metrics.record_oom_retry)."""

_counts: dict[str, int] = {}
_lock = threading.Lock()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and MPS's out-of-memory RuntimeError."""
    try:
        import torch
    except ImportError:  # no torch, no device allocator
        return False
    if isinstance(exc, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is this class
        return True
    # MPS raises a plain RuntimeError: "MPS backend out of memory (MPS allocated: ...)".
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release(device: str) -> None:
    """Give the allocator's cached blocks of `device` back, after the failed batch's tensors are gone."""
    gc.collect()  # tensors held by the failed call's frames are freed before the cache is emptied
    try:
        import torch
    except ImportError:
        return
    kind = device.split(":", 1)[0]
    if kind == "cuda" and torch.cuda.is_available():
        with torch.cuda.device(torch.device(device)):
            torch.cuda.empty_cache()
    elif kind == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def record_retry(device: str) -> None:
    """Count one halving on `device` and tell the hooks (a failing hook is logged, never raised)."""
    with _lock:
        _counts[device] = _counts.get(device, 0) + 1
    for hook in list(RETRY_HOOKS):
        try:
            hook(device)
        except Exception:  # metrics must not fail a render
            log.exception("oom retry hook failed", extra={"device": device})


def retries(device: str) -> int:
    """Halvings counted on `device` since the process started."""
    with _lock:
        return _counts.get(device, 0)
