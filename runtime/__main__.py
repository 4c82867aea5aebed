"""`python -m runtime`: serve the API on HOST:PORT from the settings (`python -m runtime worker`: jobs only)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Optional

import uvicorn
from pydantic import ValidationError

from runtime.settings import Settings


def _worker_only(settings: Settings) -> int:
    """Run job workers without the HTTP API (scale-out with REDIS_URL); PORT serves their /metrics only."""
    from avatar_contracts.logs import setup_logging
    from runtime.jobs import Runtime

    if not settings.redis_url:
        print("runtime worker: REDIS_URL must be set for a separate worker process", file=sys.stderr)
        return 2
    from prometheus_client import start_http_server

    setup_logging(settings.log_level)
    rt = Runtime(settings.model_copy(update={"run_worker": True}))
    # no API here: PORT serves the worker's own /metrics (stage times, GPU calls, retries) to Prometheus
    try:
        server, _ = start_http_server(settings.port, addr=settings.host, registry=rt.metrics.registry)
    except OSError as exc:  # PORT taken (an API process on this host): the jobs matter more than their metrics
        server = None
        logging.getLogger("runtime").warning("worker metrics not served", extra={
            "port": settings.port, "why": f"{type(exc).__name__}: {exc}; give this worker its own PORT"})
    rt.start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    # API processes may run without workers (RUN_WORKER=false): the workers re-send stalled jobs themselves
    while not done.wait(settings.job_lease_s):
        try:
            rt.reap()
        except Exception:  # noqa: BLE001 - the sweep must survive a locked or briefly missing DB
            logging.getLogger("runtime").exception("reaper sweep failed")
    rt.stop()
    if server is not None:
        server.shutdown()
    return 0


def _config_errors(exc: ValidationError) -> str:
    """One line per bad setting, without the values given (a URL or a key may hold a secret)."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in err.get("loc", ())).upper()
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {msg}" if not where or msg.startswith(where) else f"  {where}: {msg}")
    return "\n".join(lines)


def preflight(settings: Settings) -> Optional[str]:
    """Open (and migrate) the job database and check the output store: what is wrong, naming the setting, or None."""
    from runtime.db import DatabaseUnavailable, JobStore
    from runtime.errors import StoreUnavailable
    from runtime.storage import build

    try:
        JobStore(settings.database, pool_size=1).close()
        build(settings).check()
    except (DatabaseUnavailable, StoreUnavailable) as exc:
        return str(exc)
    return None


def main(argv: list[str]) -> int:
    """Start uvicorn with the app; a misconfiguration, or a database or store that cannot be used, exits 2
    with the message."""
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"runtime: invalid configuration:\n{_config_errors(exc)}", file=sys.stderr)
        return 2
    problem = preflight(settings)
    if problem is not None:
        print(f"runtime: {problem}", file=sys.stderr)
        return 2
    if argv[:1] == ["worker"]:
        return _worker_only(settings)
    from runtime.app import create_app

    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False))
    # uvicorn waits for open requests before it stops; a sync submit waiting on its job must not hold it
    app.state.shutting_down = lambda: server.should_exit
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
