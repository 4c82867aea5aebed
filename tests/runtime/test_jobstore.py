"""The shared job record and the output stores, in process: schema versions, runtimes racing on one
PostgreSQL, SKIP LOCKED claims, S3 (moto's server as the stand-in), and start-up refusals.

PostgreSQL tests run on a schema of their own (tests/runtime/conftest.py: pg_schema) and skip with
the reason when 127.0.0.1:5432 does not answer.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy

from runtime.db import LATEST, DatabaseUnavailable, JobStore
from runtime.errors import Conflict, StoreUnavailable
from runtime.settings import Settings
from runtime.storage import S3Store, build
from tests.helpers import REPO, free_port
from tests.runtime.conftest import S3_ENV, pg_schema, postgres_unreachable
from tests.runtime.test_units import sql


def versions(store: JobStore) -> list[int]:
    with store.engine.connect() as conn:
        return [r[0] for r in conn.execute(sqlalchemy.text("SELECT version FROM schema_version ORDER BY version"))]


def jobs_of(n: int, store: JobStore) -> list[str]:
    ids = [f"{i:032x}" for i in range(n)]
    for job_id in ids:
        store.create(job_id, {"text": job_id}, None)
    return ids


# -- schema versions ----------------------------------------------------------------------------


def test_a_new_database_gets_the_latest_schema_version_once(db_url):
    with JobStore(db_url) as store:
        assert versions(store) == list(range(1, LATEST + 1))
        store.create("a" * 32, {"text": "x"}, "k")
    with JobStore(db_url) as again:  # opening it again applies nothing and loses nothing
        assert versions(again) == list(range(1, LATEST + 1)) and again.counts() == {"queued": 1}


# today's schema exactly as the runtime before SQLAlchemy wrote it (hand-written SQLite, no schema_version)
UNVERSIONED = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, owner TEXT, idempotency_key TEXT, request_hash TEXT NOT NULL, request_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    chunks_done INTEGER NOT NULL DEFAULT 0, chunks_total INTEGER NOT NULL DEFAULT 0, detail TEXT, reason TEXT,
    error_type TEXT, attempts INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_until REAL, result_json TEXT,
    webhook_url TEXT, base_url TEXT, webhook_state TEXT, webhook_attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (ifnull(owner, ''), idempotency_key);
INSERT INTO jobs (id, owner, idempotency_key, request_hash, request_json, status, chunks_done, chunks_total,
                  result_json, created_at, updated_at, finished_at)
    VALUES ('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'o1', 'order-7', 'h', '{"text": "old"}', 'succeeded', 2, 2,
            '{"duration_s": 1.5}', 1, 2, 3);
"""


def test_a_job_file_of_the_current_schema_from_before_versioning_opens_as_it_is(tmp_path):
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(UNVERSIONED)
    with JobStore(path) as store:
        assert versions(store) == list(range(1, LATEST + 1))
        old = store.get("a" * 32)
        assert old["result_json"] == '{"duration_s": 1.5}' and old["chunks_done"] == 2 and old["finished_at"] == 3
        # its own unique index still holds: the same owner's key finds the old job
        assert store.count_idempotent("order-7", "o1") == 1
        with pytest.raises(Conflict, match="different body"):
            store.create("b" * 32, {"text": "new"}, "order-7", owner="o1")
        with pytest.raises(sqlalchemy.exc.IntegrityError):
            sql(store, "INSERT INTO jobs (id, owner, idempotency_key, request_hash, request_json, status,"
                       " created_at, updated_at) VALUES ('z', 'o1', 'order-7', 'h', '{}', 'queued', 0, 0)")


def test_a_database_migrated_by_a_newer_runtime_is_refused_by_name(db_url):
    with JobStore(db_url) as store:
        sql(store, f"INSERT INTO schema_version (version, description, applied_at) VALUES ({LATEST + 1}, 'future', 0)")
    with pytest.raises(DatabaseUnavailable, match=f"schema version {LATEST + 1}, newer than this runtime's {LATEST}"):
        JobStore(db_url)


def test_runtimes_starting_together_on_a_new_postgresql_schema_migrate_it_once():
    with pg_schema() as url:
        barrier = threading.Barrier(6)

        def open_store(_):
            barrier.wait()
            with JobStore(url, pool_size=1) as store:
                return versions(store)

        with ThreadPoolExecutor(6) as pool:  # without the advisory lock, six CREATE TABLEs collide
            seen = list(pool.map(open_store, range(6)))
        assert seen == [list(range(1, LATEST + 1))] * 6


# -- many runtimes on one PostgreSQL ------------------------------------------------------------


def test_two_runtimes_on_one_postgresql_racing_one_idempotency_key_make_one_job(app_client, db_url, tmp_path):
    if db_url.startswith("sqlite"):
        pytest.skip("two runtimes share a job record only on PostgreSQL")
    body = {"text": "One job for one key, whichever runtime is asked.", "avatar_id": "a"}
    other_dir = tmp_path / "second"
    with app_client(run_worker=False) as first, app_client(data_dir=other_dir, run_worker=False) as second:
        assert first.app.state.runtime.owner != second.app.state.runtime.owner
        barrier = threading.Barrier(20)

        def submit(i: int) -> httpx.Response:
            barrier.wait()
            return (first, second)[i % 2].post("/api/v1/generate?async=true", json=body,
                                               headers={"Idempotency-Key": "order-66"})

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(submit, range(20)))
        assert [a.status_code for a in answers] == [202] * 20, [a.text for a in answers if a.status_code != 202]
        assert len({a.json()["task_id"] for a in answers}) == 1
        assert first.app.state.runtime.store.counts() == second.app.state.runtime.store.counts() == {"queued": 1}
        for client in (first, second):  # the same key with another body: the documented 409, from either runtime
            other = client.post("/api/v1/generate?async=true", json={**body, "text": "Another."},
                                headers={"Idempotency-Key": "order-66"})
            assert other.status_code == 409 and other.json()["error_type"] == "conflict"
            assert answers[0].json()["task_id"] in other.json()["error"]
            mine = client.get(f"/api/v1/jobs/{answers[0].json()['task_id']}")
            assert mine.status_code == 200  # either runtime answers for the job


def test_concurrent_claims_from_two_runtimes_never_give_one_job_to_two_workers(db_url):
    with JobStore(db_url) as a, JobStore(db_url) as b:
        ids = jobs_of(40, a)
        claims: list[tuple[str, str]] = []
        barrier = threading.Barrier(8)

        def worker(n: int) -> None:
            store, owner, order = (a, b)[n % 2], f"worker-{n}", random.Random(n).sample(ids, len(ids))
            barrier.wait()
            for job_id in order:
                if store.claim(job_id, owner, lease_s=600):
                    claims.append((job_id, owner))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(j for j, _ in claims) == sorted(ids)  # every job once, none twice
        rows = {j: a.get(j) for j in ids}
        assert all(rows[j]["lease_owner"] == owner and rows[j]["attempts"] == 1 for j, owner in claims)

        # every lease lapses (their runtimes died): two sweeping runtimes split the jobs, never both re-send one
        sql(a, "UPDATE jobs SET lease_until = 0")
        barrier = threading.Barrier(2)

        def sweep(store: JobStore) -> list[str]:
            barrier.wait()
            taken = store.take_stalled(lapsed_before=time.time(), queued_before=0)
            assert all(s.lapsed for s in taken)  # each was running under a lapsed lease, none merely queued
            return [s.job_id for s in taken]

        with ThreadPoolExecutor(2) as pool:
            got_a, got_b = pool.map(sweep, (a, b))
        assert not set(got_a) & set(got_b) and sorted(got_a + got_b) == sorted(ids)
        assert a.counts() == {"queued": 40}


def test_a_job_row_locked_by_another_runtime_is_skipped_not_waited_for():
    with pg_schema() as url:
        # lock_timeout: a claim that waited for the lock would fail here rather than hang the test
        with JobStore(url + "%20-clock_timeout%3D5000") as store:
            (job_id,) = jobs_of(1, store)
            holder = store.engine.connect()
            tx = holder.begin()
            holder.execute(sqlalchemy.text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id})
            try:
                assert store.claim(job_id, "w2", lease_s=60) is None  # skipped at once: someone is claiming it
                assert store.take_stalled(lapsed_before=time.time(), queued_before=time.time() + 1) == []
            finally:
                tx.rollback()
                holder.close()
            assert store.claim(job_id, "w2", lease_s=60)["lease_owner"] == "w2"


def test_a_lease_held_by_a_dead_runtime_is_taken_over_once_it_lapses(db_url, tmp_path):
    from runtime.jobs import Runtime

    def runtime(name: str) -> Runtime:  # two runtimes, one job record (the SQLite file too, for this test)
        return Runtime(Settings(data_dir=tmp_path / name, database_url=db_url, run_worker=False, job_lease_s=2,
                                retry_max_backoff_s=1))

    dead, alive = runtime("dead"), runtime("alive")
    try:
        dead.store.create("d" * 32, {"text": "x"}, None)
        assert dead.store.claim("d" * 32, dead.owner, lease_s=2)
        dead.stop()  # it never renews again
        assert alive.store.claim("d" * 32, alive.owner, lease_s=2) is None and alive.reap() == 0
        while alive.store.get("d" * 32)["lease_until"] >= time.time():
            time.sleep(0.1)
        assert alive.reap() == 1  # handed to this runtime's workers
        taken = alive.store.claim("d" * 32, alive.owner, lease_s=30)
        assert taken["lease_owner"] == alive.owner and taken["attempts"] == 2
        assert not dead.store.renew("d" * 32, dead.owner, 30) and not dead.store.succeed("d" * 32, dead.owner, {})
    finally:
        alive.stop()


def _job_files(outputs, job_id: str, names: list[str]) -> None:
    files = outputs.open_job(job_id)
    for name in names:
        files.put(name, name.encode())
    files.close()


CHUNK = ["chunk_0000.wav", "chunk_0000.mp4", "chunk_0000.json"]
OUTPUT_FILES = sorted(["video.mp4", "captions.vtt", "timing.json", "thumbnail.jpg"])


def test_chunks_left_by_a_runtime_killed_after_recording_a_success_are_swept_by_another(db_url, s3, tmp_path):
    from runtime.jobs import Runtime

    def runtime(name: str) -> Runtime:  # two runtimes, one job record and one bucket
        return Runtime(Settings(data_dir=tmp_path / name, database_url=db_url, run_worker=False, job_lease_s=2, **s3))

    dead, alive = runtime("dead"), runtime("alive")
    try:
        job = "f" * 32
        dead.store.create(job, {"text": "x"}, None)
        assert dead.store.claim(job, dead.owner, lease_s=2)
        _job_files(dead.outputs, job, CHUNK + OUTPUT_FILES)
        assert dead.store.succeed(job, dead.owner, {"duration_s": 1.0})  # ... and it dies before removing its chunks
        dead.stop()
        assert alive.sweep_scratch() == 0  # not yet: the runtime that recorded it goes first
        time.sleep(2.1)
        assert alive.sweep_scratch() == 1
        assert alive.outputs.names(job) == OUTPUT_FILES and alive.store.get(job)["scratch_at"] is None
        assert alive.sweep_scratch() == 0  # once
    finally:
        alive.stop()


def test_an_attempt_that_lost_its_job_removes_the_chunk_it_wrote_after_the_job_succeeded(db_url, tmp_path, monkeypatch):
    from runtime import jobs, pipeline
    from runtime.jobs import Runtime

    rt = Runtime(Settings(data_dir=tmp_path, database_url=db_url, run_worker=False, job_lease_s=30))
    job = "c" * 32

    def slow_attempt(gpu, settings, job_id, body, progress, outputs, observe):
        # while this attempt makes its chunk, the job is taken over, finished and tidied by another worker
        assert rt.store.take_stalled(lapsed_before=time.time() + 60, queued_before=0)
        assert rt.store.claim(job_id, "other-worker", 30)
        _job_files(outputs, job_id, OUTPUT_FILES)
        assert rt.store.succeed(job_id, "other-worker", {"duration_s": 1.0})
        pipeline.drop_scratch(outputs, job_id)
        rt.store.scratch_removed(job_id, time.time())
        _job_files(outputs, job_id, CHUNK)  # then this attempt's chunk lands
        progress(1, 1, "joining chunks")  # and it learns the job is not its own any more
        raise AssertionError("progress() let an attempt that lost its lease go on")

    monkeypatch.setattr(jobs.pipeline, "run", slow_attempt)
    try:
        rt.store.create(job, {"text": "x"}, None)
        rt._run_job(job)
        assert rt.store.get(job)["status"] == "succeeded"
        assert rt.outputs.names(job) == OUTPUT_FILES and rt.store.get(job)["scratch_at"] is None
    finally:
        rt.stop()


def test_a_failed_jobs_chunks_are_removed_and_a_runtime_killed_before_that_leaves_them_to_the_sweep(db_url, tmp_path,
                                                                                                   monkeypatch):
    from runtime import jobs
    from runtime.errors import GPUServiceError
    from runtime.jobs import Runtime

    rt = Runtime(Settings(data_dir=tmp_path, database_url=db_url, run_worker=False, job_lease_s=2))

    def failing_attempt(gpu, settings, job_id, body, progress, outputs, observe):
        _job_files(outputs, job_id, CHUNK)  # the first chunk is made, then the second is refused for good
        raise GPUServiceError("the voice 'nobody' is not loaded", transient=False, status=422, error_type="unknown_voice")

    monkeypatch.setattr(jobs.pipeline, "run", failing_attempt)
    try:
        job = "d" * 32
        rt.store.create(job, {"text": "x"}, None)
        rt._run_job(job)
        row = rt.store.get(job)
        assert row["status"] == "failed" and row["error_type"] == "unknown_voice"
        assert rt.outputs.names(job) == [] and row["scratch_at"] is None  # nothing resumes a failed job
        # a runtime that recorded the failure and died before removing the chunk: the sweep removes it
        other = "e" * 32
        rt.store.create(other, {"text": "x"}, None)
        assert rt.store.claim(other, "dead-worker", lease_s=2)
        _job_files(rt.outputs, other, CHUNK)
        assert rt.store.fail(other, "refused", "unknown_voice", owner="dead-worker")
        assert rt.sweep_scratch() == 0  # not yet: the runtime that recorded it goes first
        time.sleep(2.1)
        assert rt.sweep_scratch() == 1
        assert rt.outputs.names(other) == [] and rt.store.get(other)["scratch_at"] is None
    finally:
        rt.stop()


# -- start-up refusals --------------------------------------------------------------------------


def _start(env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOST": "127.0.0.1", "PORT": str(free_port()),
            "DATA_DIR": str(tmp_path / "data"), "GPU_SERVICE_URL": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, "-m", "runtime"], env={**base, **env}, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("url, says", [
    ("mysql://root:hunter2@127.0.0.1/jobs", "DATABASE_URL names 'mysql', which is not supported"),
    ("not a url", "DATABASE_URL is not a database URL"),
    ("postgresql+asyncpg://db/jobs", "DATABASE_URL uses the driver 'asyncpg'"),
])
def test_a_bad_database_url_stops_the_runtime_naming_the_setting(url, says, tmp_path):
    done = _start({"DATABASE_URL": url}, tmp_path)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert "hunter2" not in done.stderr and "Traceback" not in done.stderr


def test_an_unreachable_database_stops_the_runtime_naming_the_setting(tmp_path):
    closed = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/test"
    done = _start({"DATABASE_URL": closed}, tmp_path)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("runtime: DATABASE_URL: cannot use the job database at postgresql") and "refused" in line
    assert "hunter2" not in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(DatabaseUnavailable, match="DATABASE_URL"):  # the same in process (a test's create_app)
        JobStore(closed)


def test_an_unknown_database_is_refused_at_start_up(tmp_path):
    why = postgres_unreachable()
    if why:
        pytest.skip(why)
    done = _start({"DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/no_such_db_here"}, tmp_path)
    assert done.returncode == 2 and "DATABASE_URL" in done.stderr and "no_such_db_here" in done.stderr, done.stderr


def test_a_missing_bucket_stops_the_runtime_naming_the_setting(s3_endpoint, tmp_path):
    done = _start({**S3_ENV, "OUTPUT_STORE": "s3", "S3_BUCKET": "no-such-bucket", "S3_ENDPOINT_URL": s3_endpoint},
                  tmp_path)
    assert done.returncode == 2 and "S3_BUCKET='no-such-bucket'" in done.stderr and "no such bucket" in done.stderr
    no_bucket = _start({"OUTPUT_STORE": "s3"}, tmp_path)
    assert no_bucket.returncode == 2 and "OUTPUT_STORE=s3 needs S3_BUCKET" in no_bucket.stderr


# -- S3 (moto's server) -------------------------------------------------------------------------


def test_the_s3_store_keeps_chunks_for_any_runtime_and_serves_by_presigned_url(s3, tmp_path):
    import boto3

    first = S3Store(Settings(data_dir=tmp_path / "one", **s3))
    second = S3Store(Settings(data_dir=tmp_path / "two", **s3))  # another runtime: no shared disk
    job = "e" * 32
    made = random.Random(1).randbytes(300_000)
    files = first.open_job(job)
    files.put("chunk_0000.mp4", made)
    files.put("chunk_0000.json", b'{"index": 0}')
    files.path("video.mp4").write_bytes(made[::-1])
    files.save("video.mp4")
    files.close()
    assert not files.dir.exists()  # the attempt's local copies go with it
    resumed = second.open_job(job)
    try:
        assert resumed.has("chunk_0000.json") and not resumed.has("chunk_0001.json")
        assert resumed.read("chunk_0000.json") == b'{"index": 0}'
        assert resumed.fetch("chunk_0000.mp4").read_bytes() == made  # downloaded into this runtime's folder
    finally:
        resumed.close()
    assert second.names(job) == ["chunk_0000.json", "chunk_0000.mp4", "video.mp4"]
    raw = boto3.client("s3", endpoint_url=s3["s3_endpoint_url"], region_name="us-east-1")
    assert raw.head_object(Bucket=s3["s3_bucket"], Key=f"avatar/{job}/video.mp4")["ContentType"] == "video/mp4"

    url = second.presigned_url(job, "video.mp4")
    assert url.startswith(s3["s3_endpoint_url"]) and "X-Amz-Signature=" in url and "X-Amz-Expires=3600" in url
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.content == made[::-1]
    assert fetched.headers["content-type"] == "video/mp4"
    pieces, size = second.stream(job, "video.mp4")
    assert size == len(made) and b"".join(pieces) == made[::-1]

    second.delete(job, ["chunk_0000.json", "chunk_0000.mp4"])
    assert first.names(job) == ["video.mp4"] and first.exists(job, "video.mp4") and not first.exists(job, "x.mp4")
    first.remove(job)
    assert first.names(job) == [] and not first.exists(job, "video.mp4")


def test_the_s3_store_says_what_is_wrong(s3, tmp_path):
    with pytest.raises(StoreUnavailable, match="S3_BUCKET='absent-bucket'.*no such bucket"):
        build(Settings(data_dir=tmp_path, **{**s3, "s3_bucket": "absent-bucket"})).check()
    down = build(Settings(data_dir=tmp_path, **{**s3, "s3_endpoint_url": f"http://127.0.0.1:{free_port()}"}))
    with pytest.raises(StoreUnavailable, match="S3_ENDPOINT_URL"):
        down.check()
    with pytest.raises(StoreUnavailable, match="object storage: ListObjectsV2 in bucket .* Could not connect"):
        down.open_job("f" * 32)  # a job retries on this, as on a GPU service that is down


def test_a_job_whose_bucket_is_unreachable_waits_and_retries_instead_of_failing(s3, tmp_path):
    from runtime.jobs import Runtime

    rt = Runtime(Settings(data_dir=tmp_path, run_worker=False, **{**s3, "s3_endpoint_url": f"http://127.0.0.1:{free_port()}"}))
    try:
        rt.store.create("b" * 32, {"text": "Hello.", "avatar_id": "a"}, None)
        rt._run_job("b" * 32)  # the actor, called here: its first store call fails
        row = rt.store.get("b" * 32)
        assert row["status"] == "queued" and row["attempts"] == 1, row
        assert "retry" in row["detail"] and "object storage: ListObjectsV2" in row["detail"]
        assert rt.broker.queues["avatar_jobs.DQ"].qsize() == 1  # sent again, after a backoff
    finally:
        rt.stop()


def _succeeded_job(client, store_files: dict[str, bytes]) -> str:
    """A job recorded as succeeded (by a worker of the test's own) with these output files in the runtime's store."""
    rt = client.app.state.runtime
    job_id = client.post("/api/v1/generate?async=true", json={"text": "Stored.", "avatar_id": "a"}).json()["task_id"]
    files = rt.outputs.open_job(job_id)
    for name, data in store_files.items():
        files.put(name, data)
    files.close()
    assert rt.store.claim(job_id, "test-worker", 60)
    assert rt.store.succeed(job_id, "test-worker", {"duration_s": 1.0})
    return job_id


@pytest.mark.parametrize("serve", ["redirect", "stream"])
def test_outputs_in_s3_are_served_by_redirect_or_streamed_through(app_client, s3, serve):
    video = b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 400
    with app_client(**s3, s3_serve=serve, run_worker=False) as client:
        job_id = _succeeded_job(client, {"video.mp4": video, "captions.vtt": b"WEBVTT\n"})
        resp = client.get(f"/api/v1/jobs/{job_id}/video", follow_redirects=False)
        if serve == "redirect":
            assert resp.status_code == 307 and resp.headers["cache-control"] == "no-store"
            location = resp.headers["location"]
            assert location.startswith(s3["s3_endpoint_url"]) and f"avatar/{job_id}/video.mp4" in location
            resp = httpx.get(location)  # what a client does with the redirect, straight from the bucket
        assert resp.status_code == 200 and resp.content == video and resp.headers["content-type"] == "video/mp4"
        captions = client.get(f"/api/v1/jobs/{job_id}/captions.vtt", follow_redirects=False)
        if serve == "redirect":
            captions = httpx.get(captions.headers["location"])
        assert captions.status_code == 200 and captions.text == "WEBVTT\n" and "text/vtt" in captions.headers["content-type"]
        missing = client.get(f"/api/v1/jobs/{job_id}/thumbnail.jpg", follow_redirects=False)
        assert missing.status_code == 404 and "expired" in missing.json()["error"]
        other = client.get(f"/api/v1/jobs/{job_id}/video", headers={"X-API-Key": "k2"}, follow_redirects=False)
        assert other.status_code == 404  # another key never gets a URL
        assert client.get("/ready").status_code == 200


def test_an_unreachable_bucket_is_a_503_with_a_request_id_and_not_ready(app_client, s3, monkeypatch):
    from moto.server import ThreadedMotoServer

    port = free_port()  # a server of this test's own, to stop under the runtime
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    own = {**s3, "s3_endpoint_url": f"http://127.0.0.1:{port}"}
    try:
        import boto3

        boto3.client("s3", endpoint_url=own["s3_endpoint_url"], region_name="us-east-1").create_bucket(Bucket=own["s3_bucket"])
        with app_client(**own, run_worker=False) as client:
            job_id = _succeeded_job(client, {"video.mp4": b"x"})
            assert client.get(f"/api/v1/jobs/{job_id}/video", follow_redirects=False).status_code == 307
            server.stop()
            server = None
            resp = client.get(f"/api/v1/jobs/{job_id}/video", follow_redirects=False)
            assert resp.status_code == 503 and resp.json()["error_type"] == "output_store_unavailable"
            assert resp.json()["request_id"] and "Traceback" not in resp.text
            ready = client.get("/ready")
            assert ready.status_code == 503 and any("S3_ENDPOINT_URL" in p for p in ready.json()["problems"])
    finally:
        if server is not None:
            server.stop()


def test_the_local_store_serves_files_exactly_as_before(app_client, tmp_path):
    with app_client(run_worker=False) as client:
        job_id = _succeeded_job(client, {"video.mp4": b"local video bytes"})
        assert (tmp_path / "jobs" / job_id / "video.mp4").read_bytes() == b"local video bytes"
        resp = client.get(f"/api/v1/jobs/{job_id}/video", follow_redirects=False)
        assert resp.status_code == 200 and resp.content == b"local video bytes"
        assert resp.headers["content-type"] == "video/mp4" and resp.headers.get("accept-ranges") == "bytes"
