"""Peak memory of a service: what its /health reports, else /proc/<pid>/status VmHWM, else "unknown".

The pid is the one given on the command line, or the process listening on the URL's port
(found with psutil when it is installed and the service runs on this machine).
"""

from __future__ import annotations

import logging
from typing import Optional
from urllib.parse import urlparse

log = logging.getLogger(__name__)

_HEALTH_KEYS = ("peak_memory_mb", "peak_rss_mb", "memory_peak_mb")


def from_health(health: Optional[dict]) -> Optional[dict]:
    """A peak-memory figure reported by a service's /health, if it reports one (top level or under memory)."""
    if not isinstance(health, dict):
        return None
    for scope in (health, health.get("memory") if isinstance(health.get("memory"), dict) else {}):
        for key in _HEALTH_KEYS:
            if isinstance(scope.get(key), (int, float)):
                out = {"peak_mb": float(scope[key]), "source": f"/health {key}"}
                gpu = scope.get("gpu_peak_mb") or scope.get("cuda_peak_mb")
                if isinstance(gpu, (int, float)):
                    out["gpu_peak_mb"] = float(gpu)
                return out
    return None


def vm_hwm_mb(pid: int) -> Optional[float]:
    """Peak resident set (VmHWM) of a local process in MiB, or None when it cannot be read."""
    try:
        with open(f"/proc/{int(pid)}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


def pid_for_url(url: str) -> Optional[int]:
    """The local process listening on the URL's port, via psutil; None when unknown or not local."""
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "0.0.0.0", "::1"):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        import psutil
    except ImportError:
        return None
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    except (psutil.AccessDenied, PermissionError, OSError):
        return None
    return None


def peak_memory(health: Optional[dict], pid: Optional[int], url: str) -> dict:
    """Best available peak-memory record of one service; {"peak_mb": None, "source": "unknown"} otherwise."""
    reported = from_health(health)
    if reported:
        return reported
    how = "--pid"
    if pid is None:
        pid, how = pid_for_url(url), "port lookup (psutil)"
    if pid is not None:
        mb = vm_hwm_mb(pid)
        if mb is not None:
            return {"peak_mb": round(mb, 1), "source": f"/proc/{pid}/status VmHWM ({how})", "pid": pid}
    return {"peak_mb": None, "source": "unknown"}
