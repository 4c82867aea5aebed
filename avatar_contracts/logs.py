"""Structured (one JSON object per line) logging shared by the services, each line with its request id.

The id of the request being served (or of the request that made the job being run) is held in a
context variable: set by the HTTP middleware for each request and by the runtime's worker for each
job, copied into the threads that do their work (asyncio.to_thread, the engine slots, the job's
pools), and written on every line logged meanwhile without each call having to pass it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Optional

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

REQUEST_ID: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("request_id", default=None)
"""The id of the request (or job) whose work the current code does; None outside any."""


def current_request_id() -> Optional[str]:
    """The request id bound to the current context, or None."""
    return REQUEST_ID.get()


def bind_request_id(request_id: Optional[str]) -> contextvars.Token:
    """Bind `request_id` to the current context; give the token to `REQUEST_ID.reset` when done."""
    return REQUEST_ID.set(request_id)


class JsonFormatter(logging.Formatter):
    """Render a record and its `extra=` fields as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        bound = REQUEST_ID.get()
        if bound is not None and not hasattr(record, "request_id"):
            payload["request_id"] = bound
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


OWN_LOGGERS = ("avatar_contracts", "gpu_service", "runtime", "evaluator")
"""The project's own loggers: only these log at debug level. Libraries stay at info or above whatever
LOG_LEVEL says, since their debug lines carry content (Piper logs each sentence's text and phonemes)."""


def _set_levels(level: str) -> None:
    wanted = logging.getLevelName(level.upper())
    logging.getLogger().setLevel(max(wanted, logging.INFO))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(wanted)


def setup_logging(level: str = "info") -> None:
    """Send every logger's records to stderr as JSON lines, once per process (the levels on every call)."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        _set_levels(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    _set_levels(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
