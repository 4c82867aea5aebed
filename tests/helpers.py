"""Helpers shared by the test tiers: free ports, real service processes polled until ready."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout_s: float = 120.0, proc: Optional[subprocess.Popen] = None) -> None:
    """Poll `url` until it answers 200, the process dies, or the time runs out (bounded loop)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            resp = httpx.get(url, timeout=2.0)
            if resp.status_code == 200:
                return
            last = f"{resp.status_code} {resp.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout_s}s: {last}")


@contextlib.contextmanager
def service_process(
    argv: list[str], env: dict[str, str], ready_url: str, log_path: Path, timeout_s: float = 180.0
) -> Iterator[subprocess.Popen]:
    """Run a service as a real process until the block ends; its log goes to `log_path`."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(ready_url, timeout_s, proc)
            yield proc
        except BaseException:
            sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
            raise
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
    """Stop a process group started by service_process (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def parse_metrics(text: str) -> tuple[dict, dict]:
    """({family name: type}, {(sample name, sorted labels): value}) of a Prometheus text scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    types, values = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return types, values
