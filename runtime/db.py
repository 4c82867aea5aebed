"""The durable job record, the truth about every job: SQLite (default, one file, WAL) or PostgreSQL.

One table definition (SQLAlchemy Core) serves both; what differs between the two databases lives
in two places only: how an engine is made (`make_engine`) and the migration lock (`_migration_lock`).

The broker only carries job ids; whatever it delivers, a worker first asks this table whether
the job still needs doing and takes a lease on it, so a message delivered twice never makes
two outputs.

- Idempotency keys are unique per owner (the API key's fingerprint): a unique index over
  `coalesce(owner, '')` and the key. Concurrent identical submits race on the insert, from one
  runtime or many sharing the database, and all but one lose inside the database, with no lock of ours.
- A claim takes a job that is queued, or running under a lapsed lease (its worker died), in one
  `UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING *`. On PostgreSQL a row
  another runtime is claiming right now is skipped, not waited for; SQLite has one writer at a
  time, so the statement is atomic there as it stands (it renders no FOR UPDATE).
- Leases are wall-clock times (seconds since the epoch) written by the runtimes, so runtimes on
  several hosts need synchronised clocks (NTP): a skew of a second is nothing against a 30 s lease.

Schema versions: a `schema_version` table records the migrations applied; `MIGRATIONS` lists them
in order, and every start-up applies the missing ones under a lock (PostgreSQL's
`pg_advisory_xact_lock`, SQLite's write lock), so runtimes starting together migrate once.
A new database is created from the table definition and stamped with the latest version; a
database from before versioning (no `schema_version`, a `jobs` table) is version 0 and goes
through every migration, the first of which brings any earlier runtime's file to today's schema.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

from sqlalchemy import (
    CheckConstraint,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.schema import CreateIndex
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError

from runtime.errors import Conflict

log = logging.getLogger("runtime.db")

TERMINAL = ("succeeded", "failed")
UNFINISHED = ("queued", "running")

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", Text, primary_key=True),
    # the fingerprint of the API key that made the job (NULL when the runtime has no keys)
    Column("owner", Text),
    Column("idempotency_key", Text),
    Column("request_hash", Text, nullable=False),
    Column("request_json", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("chunks_done", Integer, nullable=False, server_default="0"),
    Column("chunks_total", Integer, nullable=False, server_default="0"),
    Column("detail", Text),
    Column("reason", Text),
    Column("error_type", Text),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("lease_owner", Text),
    Column("lease_until", Float),
    Column("result_json", Text),
    Column("webhook_url", Text),
    Column("base_url", Text),
    # the request that made the job: carried on every log line and GPU-service call of its attempts
    Column("request_id", Text),
    Column("webhook_state", Text),
    Column("webhook_attempts", Integer, nullable=False, server_default="0"),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    # when the job ended with chunk files left in the output store to remove (NULL: none left)
    Column("scratch_at", Float),
    CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed')", name="jobs_status_check"),
)
Index("jobs_status", jobs.c.status)
# an idempotency key is unique per owner, so two clients never see each other's jobs through one
Index("jobs_idempotency", func.coalesce(jobs.c.owner, ""), jobs.c.idempotency_key, unique=True)

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("description", Text, nullable=False),
    Column("applied_at", Float, nullable=False),
)


class DatabaseUnavailable(RuntimeError):
    """The job database cannot be opened or used at start-up; the message names the setting to fix."""


def key_fingerprint(api_key: str) -> str:
    """What a job records of the API key that made it: a SHA-256 digest, never the key."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def request_hash(body: dict[str, Any]) -> str:
    """A stable digest of a request body (key order and whitespace do not matter)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# -- URLs and engines ---------------------------------------------------------------------------


def normalize_url(raw: str) -> str:
    """DATABASE_URL as SQLAlchemy takes it: postgresql:// (or postgres://) gets the psycopg 3 driver;
    sqlite:///path stays. Anything else is a ValueError that names the setting."""
    try:
        url = make_url(raw.strip())
    except ArgumentError:
        raise ValueError("DATABASE_URL is not a database URL; use postgresql://user:password@host:5432/dbname") from None
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend in ("postgresql", "postgres"):
        if url.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise ValueError(f"DATABASE_URL uses the driver {driver!r}; use postgresql:// (psycopg 3 is the driver installed)")
        url = url.set(drivername="postgresql+psycopg")
    elif backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ValueError("DATABASE_URL names an in-memory SQLite database, which connections do not share; "
                             "name a file (sqlite:////path/jobs.db) or leave DATABASE_URL unset")
    else:
        raise ValueError(f"DATABASE_URL names {backend!r}, which is not supported; use postgresql://... "
                         "(or leave it unset for SQLite)")
    return url.render_as_string(hide_password=False)


def describe_url(url: Union[str, URL]) -> str:
    """The URL with its password hidden, for logs and messages."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """A SQLAlchemy engine for the job database, set up for its dialect (the one place that knows them)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, pool_size=pool_size, max_overflow=2 * pool_size,
                               connect_args={"timeout": 30.0, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:
            # the driver's own transaction handling is off; `_on_begin` says BEGIN itself (SQLAlchemy's recipe)
            dbapi_conn.isolation_level = None
            for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL"):
                dbapi_conn.execute(f"PRAGMA {pragma}")

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock at once: a transaction that reads before it writes then waits
            # for another writer (busy_timeout) instead of failing when that writer commits first
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

        return engine
    connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": 10}
    return create_engine(parsed, pool_size=pool_size, max_overflow=2 * pool_size, pool_pre_ping=True,
                         connect_args=connect_args)


# -- migrations ---------------------------------------------------------------------------------


def _m1_owned_idempotency(conn: Connection) -> None:
    """Today's schema. Files from before job ownership have no `owner` column and a UNIQUE idempotency_key
    across all callers; SQLite cannot drop a column constraint, so that table is rebuilt and its rows
    copied (their owner stays NULL: they are visible only while the runtime runs without API keys).

    Built from the one table definition: while no later migration changes `jobs`, that is version 1.
    """
    columns = [c["name"] for c in inspect(conn).get_columns("jobs")]
    if "owner" not in columns:
        conn.execute(text("ALTER TABLE jobs RENAME TO jobs_v0"))
        for index in jobs.indexes:  # SQLite index names are per database: the old table's go with it
            conn.execute(text(f"DROP INDEX IF EXISTS {index.name}"))
        jobs.create(conn)
        old = Table("jobs_v0", MetaData(), autoload_with=conn)
        conn.execute(insert(jobs).from_select(columns, select(*(old.c[name] for name in columns))))
        old.drop(conn)
    for index in jobs.indexes:  # IF NOT EXISTS: reflection does not see the expression index to check first
        conn.execute(CreateIndex(index, if_not_exists=True))


def _m2_request_id(conn: Connection) -> None:
    """Jobs remember the request that made them (`request_id`), for their logs and GPU-service calls."""
    if "request_id" not in [c["name"] for c in inspect(conn).get_columns("jobs")]:
        conn.execute(text("ALTER TABLE jobs ADD COLUMN request_id TEXT"))


def _m3_scratch_at(conn: Connection) -> None:
    """Finished jobs say whether chunk files are left to remove (`scratch_at`), so that chunks a runtime
    did not remove (it died between recording the success and removing them) are removed by another."""
    if "scratch_at" not in [c["name"] for c in inspect(conn).get_columns("jobs")]:
        conn.execute(text("ALTER TABLE jobs ADD COLUMN scratch_at FLOAT"))  # double precision on PostgreSQL


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "jobs table with idempotency keys unique per owner", _m1_owned_idempotency),
    (2, "jobs remember the request id that made them", _m2_request_id),
    (3, "finished jobs say whether chunk files are left to remove", _m3_scratch_at),
]
"""(version, description, step) in order: step N brings a database at version N-1 to version N."""

LATEST = MIGRATIONS[-1][0]


def _migration_lock(conn: Connection) -> None:
    """Hold the database's migration lock until the transaction ends (SQLite: its BEGIN IMMEDIATE write lock)."""
    if conn.dialect.name == "postgresql":  # per schema, so runtimes on different schemas do not wait for each other
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('avatar-runtime schema ' || current_schema()))"))


def migrate(engine: Engine) -> int:
    """Bring the database to the latest schema version under the migration lock; returns the version it found."""
    with engine.connect() as conn:
        conn = conn.execution_options(immediate=True)
        with conn.begin():
            _migration_lock(conn)
            inspector = inspect(conn)
            if inspector.has_table("schema_version"):
                found = conn.execute(select(func.max(schema_version.c.version))).scalar() or 0
            else:
                found = 0
                schema_version.create(conn)
            if found > LATEST:
                raise DatabaseUnavailable(
                    f"the job database is at schema version {found}, newer than this runtime's {LATEST}: "
                    "a newer runtime migrated it; run that version (or point DATABASE_URL at another database)")
            now = time.time()
            if found == 0 and not inspector.has_table("jobs"):  # a new database: today's tables as defined
                jobs.create(conn)
                conn.execute(insert(schema_version), [
                    {"version": v, "description": d, "applied_at": now} for v, d, _ in MIGRATIONS])
                return found
            for version, description, step in MIGRATIONS:
                if version > found:
                    step(conn)
                    conn.execute(insert(schema_version).values(version=version, description=description, applied_at=now))
                    log.info("job database migrated", extra={"schema_version": version, "migration": description})
    return found


# -- the store ----------------------------------------------------------------------------------


class Stalled(NamedTuple):
    """A job the reaper hands out again (`JobStore.take_stalled`)."""

    job_id: str
    lapsed: bool
    """It was running under a lapsed lease (its worker died); else it sat queued too long (a lost message)."""



def _row(row: Any) -> Optional[dict]:
    return dict(row._mapping) if row is not None else None


class JobStore:
    """Thread-safe access to the jobs table through a pool of connections; opening it migrates the schema."""

    def __init__(self, url: Union[str, Path], pool_size: int = 5) -> None:
        if isinstance(url, Path) or "://" not in str(url):
            url = f"sqlite:///{Path(url)}"
        self.url = normalize_url(str(url))
        self.dialect = make_url(self.url).get_backend_name()
        where = describe_url(self.url) if self.dialect == "postgresql" else make_url(self.url).database
        setting = "DATABASE_URL" if self.dialect == "postgresql" else "DATA_DIR (or DATABASE_URL)"
        try:
            self.engine = make_engine(self.url, pool_size)
        except OSError as exc:
            raise DatabaseUnavailable(f"{setting}: cannot create the job database at {where}: {exc}") from None
        try:
            migrate(self.engine)
        except DatabaseUnavailable:
            self.engine.dispose()
            raise
        except SQLAlchemyError as exc:
            self.engine.dispose()
            orig = getattr(exc, "orig", None) or exc
            why = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
            raise DatabaseUnavailable(f"{setting}: cannot use the job database at {where}: {why}") from None

    def describe(self) -> str:
        """Where the record is, password hidden."""
        return describe_url(self.url)

    def close(self) -> None:
        """Close the pool's connections."""
        self.engine.dispose()

    def __enter__(self) -> "JobStore":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def ping(self) -> bool:
        """True when the database answers a query."""
        with self.engine.connect() as conn:
            return conn.execute(select(1)).scalar() == 1

    def _write(self, statement) -> Any:
        with self.engine.begin() as conn:
            return conn.execute(statement)

    def _changed(self, statement) -> bool:
        return self._write(statement).rowcount == 1

    # -- submit ---------------------------------------------------------------------------

    def create(
        self, job_id: str, body: dict[str, Any], idempotency_key: Optional[str], base_url: Optional[str] = None,
        owner: Optional[str] = None, request_id: Optional[str] = None,
    ) -> tuple[dict, bool]:
        """Insert a queued job for `owner` (a key fingerprint) made by request `request_id`; with an idempotency
        key that owner already used, return that job (same body) or raise Conflict."""
        digest = request_hash(body)
        now = time.time()
        row = {"id": job_id, "owner": owner, "idempotency_key": idempotency_key, "request_hash": digest,
               "request_json": json.dumps(body), "status": "queued", "webhook_url": body.get("webhook_url"),
               "base_url": base_url, "request_id": request_id, "created_at": now, "updated_at": now}
        try:
            with self.engine.begin() as conn:
                created = conn.execute(insert(jobs).values(**row).returning(*jobs.c)).one()
            return _row(created), True
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self._idempotent(idempotency_key, owner)
            if existing is None:  # pragma: no cover - a unique failure implies the row exists
                raise
            if existing["request_hash"] != digest:
                raise Conflict(
                    f"Idempotency-Key {idempotency_key!r} was already used with a different body "
                    f"(job {existing['id']}); use a new key for a new request"
                ) from None
            return existing, False

    # -- reads ----------------------------------------------------------------------------

    def _one(self, statement) -> Optional[dict]:
        with self.engine.connect() as conn:
            return _row(conn.execute(statement).first())

    def get(self, job_id: str) -> Optional[dict]:
        """The job's row as a dict, or None."""
        return self._one(select(jobs).where(jobs.c.id == job_id))

    def unfinished(self) -> list[dict]:
        """Jobs that are queued or running, oldest first (restart recovery)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.status.in_(UNFINISHED)).order_by(jobs.c.created_at))
            return [_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """How many jobs are in each status."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
            return {status: count for status, count in rows}

    def _idempotent(self, key: str, owner: Optional[str]) -> Optional[dict]:
        return self._one(select(jobs).where(func.coalesce(jobs.c.owner, "") == (owner or ""),
                                            jobs.c.idempotency_key == key))

    def count_idempotent(self, key: str, owner: Optional[str] = None) -> int:
        """Jobs one owner recorded under an idempotency key (0 or 1: the pair is unique)."""
        return 0 if self._idempotent(key, owner) is None else 1

    def expired(self, before: float) -> list[str]:
        """Finished jobs older than `before` (their outputs are due for removal)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.id).where(jobs.c.status.in_(TERMINAL), jobs.c.finished_at < before))
            return [r[0] for r in rows]

    # -- worker side ----------------------------------------------------------------------

    def claim(self, job_id: str, owner: str, lease_s: float) -> Optional[dict]:
        """Take the job for `owner` if it is queued, or running under a lapsed lease; the row as it now is, or
        None. A row another worker is claiming this instant counts as taken (SKIP LOCKED).

        A live lease is never taken, not even one `owner` holds: an owner is one runtime process, so its
        live lease means another of its worker threads is running the job, and a second message for the
        job (the reaper re-sends long-queued jobs; delivery is at-least-once) must not start it twice."""
        now = time.time()
        claimable = select(jobs.c.id).where(
            jobs.c.id == job_id,
            or_(jobs.c.status == "queued",
                and_(jobs.c.status == "running", or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < now))),
        ).with_for_update(skip_locked=True)
        statement = (
            update(jobs).where(jobs.c.id == claimable.scalar_subquery())
            .values(status="running", lease_owner=owner, lease_until=now + lease_s, attempts=jobs.c.attempts + 1,
                    started_at=func.coalesce(jobs.c.started_at, now), updated_at=now, detail="started")
            .returning(*jobs.c)
        )
        with self.engine.begin() as conn:
            return _row(conn.execute(statement).first())

    def take_stalled(self, lapsed_before: float, queued_before: float) -> list["Stalled"]:
        """Jobs nobody is working on, handed to one caller: running under a lease that lapsed before
        `lapsed_before` (put back to queued; `lapsed` true: its worker died, and the job is taken over) or
        queued and untouched since `queued_before` (touched).

        Two runtimes sweeping at once never both get a job (SKIP LOCKED), so a stalled job is re-sent once.
        The rows are read and updated in one transaction that holds them (SQLite: its write lock, taken
        first), so what each row was is known after the update has changed it.
        """
        now = time.time()
        lapsed = and_(jobs.c.status == "running", or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < lapsed_before))
        stalled = (
            select(jobs.c.id, jobs.c.status)
            .where(or_(lapsed, and_(jobs.c.status == "queued", jobs.c.updated_at < queued_before)))
            .with_for_update(skip_locked=True)
        )
        with self.engine.connect() as conn:
            conn = conn.execution_options(immediate=True)
            with conn.begin():
                found = [Stalled(row.id, row.status == "running") for row in conn.execute(stalled)]
                if found:
                    conn.execute(update(jobs).where(jobs.c.id.in_([s.job_id for s in found]))
                                 .values(status="queued", lease_owner=None, lease_until=None, updated_at=now))
        return found

    def _ours(self, job_id: str, owner: str):
        return and_(jobs.c.id == job_id, jobs.c.status == "running", jobs.c.lease_owner == owner)

    def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend our lease; False when the job is no longer ours."""
        return self._changed(update(jobs).where(self._ours(job_id, owner)).values(lease_until=time.time() + lease_s))

    def progress(self, job_id: str, owner: str, done: int, total: int, detail: str) -> bool:
        """Record finished chunks; False when the job is no longer ours."""
        return self._changed(update(jobs).where(self._ours(job_id, owner)).values(
            chunks_done=done, chunks_total=total, detail=detail, updated_at=time.time()))

    def release(self, job_id: str, owner: str, detail: str) -> bool:
        """Put a running job back to queued (a transient failure; it will be retried)."""
        return self._changed(update(jobs).where(self._ours(job_id, owner)).values(
            status="queued", lease_owner=None, lease_until=None, detail=detail, updated_at=time.time()))

    def succeed(self, job_id: str, owner: str, result: dict) -> bool:
        """Mark our running job succeeded with its result; False when it was not ours to finish."""
        now = time.time()
        return self._changed(update(jobs).where(self._ours(job_id, owner)).values(
            status="succeeded", result_json=json.dumps(result), chunks_done=jobs.c.chunks_total, detail=None,
            lease_owner=None, lease_until=None, updated_at=now, finished_at=now, scratch_at=now))

    def scratch_left(self, job_id: str) -> bool:
        """Note that a finished job may have chunk files in the store (an attempt that failed it, or one that
        lost the job and wrote some after it had finished); False when the job has not finished."""
        return self._changed(update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(TERMINAL))
                             .values(scratch_at=time.time()))

    def scratch_removed(self, job_id: str, listed_at: float) -> None:
        """Forget the job's chunk files, removed by a listing of the store that began at `listed_at`; a note
        made after that (chunk files written since) stays."""
        self._write(update(jobs).where(jobs.c.id == job_id, jobs.c.scratch_at <= listed_at).values(scratch_at=None))

    def with_scratch(self, before: float, limit: int = 100) -> list[str]:
        """Finished jobs noted (before `before`) as having chunk files left that nobody has removed since."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.id).where(jobs.c.scratch_at < before)
                                .order_by(jobs.c.scratch_at).limit(limit))
            return [r[0] for r in rows]

    def fail(self, job_id: str, reason: str, error_type: str, owner: Optional[str] = None) -> bool:
        """Mark an unfinished job failed with its reason (ours, or any unfinished one when owner is None)."""
        now = time.time()
        where = and_(jobs.c.id == job_id, jobs.c.status.in_(UNFINISHED))
        if owner is not None:  # only under our lease: once the reaper re-queued the job, an abandoned attempt cannot fail it
            where = and_(where, jobs.c.lease_owner == owner)
        return self._changed(update(jobs).where(where).values(
            status="failed", reason=reason, error_type=error_type, detail=None, lease_owner=None, lease_until=None,
            updated_at=now, finished_at=now, scratch_at=now))

    def webhook_state(self, job_id: str, state: str, attempts: int) -> None:
        """Record how the job's webhook delivery went (pending, delivered, gave_up)."""
        self._write(update(jobs).where(jobs.c.id == job_id).values(webhook_state=state, webhook_attempts=attempts))

    def delete(self, job_id: str) -> None:
        """Forget a job (after its outputs were removed)."""
        self._write(delete(jobs).where(jobs.c.id == job_id))

