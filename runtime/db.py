"""The durable job record: one SQLite file (WAL), the truth about every job.

The broker only carries job ids; whatever it delivers, a worker first asks this table whether
the job still needs doing and takes a lease on it, so a message delivered twice never makes
two outputs. Idempotency keys are UNIQUE per API key (an index over the owner and the key):
concurrent identical submits race on the insert and all but one lose, inside SQLite, with no
lock of ours.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Optional

from runtime.errors import Conflict

TERMINAL = ("succeeded", "failed")

_TABLE = """
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    owner            TEXT,
    idempotency_key  TEXT,
    request_hash     TEXT NOT NULL,
    request_json     TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    chunks_done      INTEGER NOT NULL DEFAULT 0,
    chunks_total     INTEGER NOT NULL DEFAULT 0,
    detail           TEXT,
    reason           TEXT,
    error_type       TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_until      REAL,
    result_json      TEXT,
    webhook_url      TEXT,
    base_url         TEXT,
    request_id       TEXT,
    webhook_state    TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL
)
"""
# `owner` is the fingerprint of the API key that made the job (NULL when the runtime has no keys);
# an idempotency key is unique per owner, so two clients never see each other's jobs through one.
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status)",
    "CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (ifnull(owner, ''), idempotency_key)",
)


def key_fingerprint(api_key: str) -> str:
    """What a job records of the API key that made it: a SHA-256 digest, never the key."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def _migrate(conn: sqlite3.Connection) -> None:
    """Create the table, or bring one written by an older runtime up to date, in one transaction.

    Files from before job ownership have no `owner` column and a UNIQUE idempotency_key across
    all callers; SQLite cannot drop a column constraint, so the table is rebuilt and its rows copied
    (their owner stays NULL: they are visible only while the runtime runs without API keys).
    """
    conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait and then find it done
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
        if columns and "owner" not in columns:
            conn.execute("ALTER TABLE jobs RENAME TO jobs_v1")
            conn.execute(_TABLE)
            listed = ", ".join(columns)
            conn.execute(f"INSERT INTO jobs ({listed}) SELECT {listed} FROM jobs_v1")
            conn.execute("DROP TABLE jobs_v1")
        else:
            conn.execute(_TABLE)
            if columns and "request_id" not in columns:  # files from before request ids were kept
                conn.execute("ALTER TABLE jobs ADD COLUMN request_id TEXT")
        for statement in _INDEXES:
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def request_hash(body: dict[str, Any]) -> str:
    """A stable digest of a request body (key order and whitespace do not matter)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class JobStore:
    """Thread-safe access to the jobs table; each thread keeps its own connection."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        _migrate(conn)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # autocommit (isolation_level=None): every statement is its own transaction unless we BEGIN
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def ping(self) -> bool:
        """True when the database answers a query."""
        return self._conn().execute("SELECT 1").fetchone()[0] == 1

    # -- submit ---------------------------------------------------------------------------

    def create(
        self, job_id: str, body: dict[str, Any], idempotency_key: Optional[str], base_url: Optional[str] = None,
        owner: Optional[str] = None, request_id: Optional[str] = None,
    ) -> tuple[dict, bool]:
        """Insert a queued job for `owner` (a key fingerprint) made by request `request_id`; with an idempotency
        key that owner already used, return that job (same body) or raise Conflict."""
        digest = request_hash(body)
        now = time.time()
        try:
            self._conn().execute(
                "INSERT INTO jobs (id, owner, idempotency_key, request_hash, request_json, status, webhook_url,"
                " base_url, request_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, owner, idempotency_key, digest, json.dumps(body), body.get("webhook_url"), base_url,
                 request_id, now, now),
            )
            return self.get(job_id), True
        except sqlite3.IntegrityError:
            if idempotency_key is None:
                raise
            row = self._idempotent(idempotency_key, owner)
            if row is None:  # pragma: no cover - a UNIQUE failure implies the row exists
                raise
            if row["request_hash"] != digest:
                raise Conflict(
                    f"Idempotency-Key {idempotency_key!r} was already used with a different body "
                    f"(job {row['id']}); use a new key for a new request"
                ) from None
            return dict(row), False

    # -- reads ----------------------------------------------------------------------------

    def get(self, job_id: str) -> Optional[dict]:
        """The job's row as a dict, or None."""
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    def unfinished(self) -> list[dict]:
        """Jobs that are queued or running, oldest first (restart recovery)."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY created_at"
        ).fetchall()
        return [dict(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """How many jobs are in each status."""
        rows = self._conn().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {r[0]: r[1] for r in rows}

    def _idempotent(self, key: str, owner: Optional[str]) -> Optional[sqlite3.Row]:
        return self._conn().execute(
            "SELECT * FROM jobs WHERE ifnull(owner, '') = ? AND idempotency_key = ?", (owner or "", key)
        ).fetchone()

    def count_idempotent(self, key: str, owner: Optional[str] = None) -> int:
        """Jobs one owner recorded under an idempotency key (0 or 1: the pair is UNIQUE)."""
        return 0 if self._idempotent(key, owner) is None else 1

    def expired(self, before: float) -> list[str]:
        """Finished jobs older than `before` (their outputs are due for removal)."""
        rows = self._conn().execute(
            "SELECT id FROM jobs WHERE status IN ('succeeded', 'failed') AND finished_at < ?", (before,)
        ).fetchall()
        return [r[0] for r in rows]

    # -- worker side ----------------------------------------------------------------------

    def claim(self, job_id: str, owner: str, lease_s: float) -> Optional[dict]:
        """Take the job for `owner` if it is queued, or running under a lapsed (or our own) lease."""
        now = time.time()
        cur = self._conn().execute(
            "UPDATE jobs SET status = 'running', lease_owner = ?, lease_until = ?, attempts = attempts + 1,"
            " started_at = COALESCE(started_at, ?), updated_at = ?, detail = 'started'"
            " WHERE id = ? AND (status = 'queued' OR (status = 'running' AND"
            " (lease_until IS NULL OR lease_until < ? OR lease_owner = ?)))",
            (owner, now + lease_s, now, now, job_id, now, owner),
        )
        return self.get(job_id) if cur.rowcount == 1 else None

    def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend our lease; False when the job is no longer ours."""
        now = time.time()
        cur = self._conn().execute(
            "UPDATE jobs SET lease_until = ? WHERE id = ? AND status = 'running' AND lease_owner = ?",
            (now + lease_s, job_id, owner),
        )
        return cur.rowcount == 1

    def progress(self, job_id: str, owner: str, done: int, total: int, detail: str) -> bool:
        """Record finished chunks; False when the job is no longer ours."""
        cur = self._conn().execute(
            "UPDATE jobs SET chunks_done = ?, chunks_total = ?, detail = ?, updated_at = ?"
            " WHERE id = ? AND status = 'running' AND lease_owner = ?",
            (done, total, detail, time.time(), job_id, owner),
        )
        return cur.rowcount == 1

    def release(self, job_id: str, owner: str, detail: str) -> bool:
        """Put a running job back to queued (a transient failure; it will be retried)."""
        cur = self._conn().execute(
            "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_until = NULL, detail = ?, updated_at = ?"
            " WHERE id = ? AND status = 'running' AND lease_owner = ?",
            (detail, time.time(), job_id, owner),
        )
        return cur.rowcount == 1

    def succeed(self, job_id: str, owner: str, result: dict) -> bool:
        """Mark our running job succeeded with its result; False when it was not ours to finish."""
        now = time.time()
        cur = self._conn().execute(
            "UPDATE jobs SET status = 'succeeded', result_json = ?, chunks_done = chunks_total, detail = NULL,"
            " lease_owner = NULL, lease_until = NULL, updated_at = ?, finished_at = ?"
            " WHERE id = ? AND status = 'running' AND lease_owner = ?",
            (json.dumps(result), now, now, job_id, owner),
        )
        return cur.rowcount == 1

    def fail(self, job_id: str, reason: str, error_type: str, owner: Optional[str] = None) -> bool:
        """Mark an unfinished job failed with its reason (ours, or any unfinished one when owner is None)."""
        now = time.time()
        sql = (
            "UPDATE jobs SET status = 'failed', reason = ?, error_type = ?, detail = NULL, lease_owner = NULL,"
            " lease_until = NULL, updated_at = ?, finished_at = ? WHERE id = ? AND status IN ('queued', 'running')"
        )
        args: tuple = (reason, error_type, now, now, job_id)
        if owner is not None:
            sql += " AND (lease_owner = ? OR lease_owner IS NULL)"
            args += (owner,)
        return self._conn().execute(sql, args).rowcount == 1

    def webhook_state(self, job_id: str, state: str, attempts: int) -> None:
        """Record how the job's webhook delivery went (pending, delivered, gave_up)."""
        self._conn().execute(
            "UPDATE jobs SET webhook_state = ?, webhook_attempts = ? WHERE id = ?", (state, attempts, job_id)
        )

    def delete(self, job_id: str) -> None:
        """Forget a job (after its outputs were removed)."""
        self._conn().execute("DELETE FROM jobs WHERE id = ?", (job_id,))
