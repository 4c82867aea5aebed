"""Tier 3, several runtimes: real runtime processes sharing one PostgreSQL job record and one S3 bucket
(moto's S3 server, the stand-in for S3 here), with the real GPU service. No shared disk: each runtime
has a DATA_DIR of its own.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time

import boto3
import httpx
import pytest

from tests.runtime.conftest import S3_ENV, client, pg_schema, runtime_proc, stream_lengths, wait_job
from tests.runtime.test_e2e import LONG

pytestmark = pytest.mark.slow


def _chunk_indices(raw, bucket: str, prefix: str) -> set[int]:
    """Chunks whose metadata (written last) is in the bucket: the chunks finished so far."""
    listing = raw.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    names = [obj["Key"][len(prefix):] for obj in listing]
    return {int(n[len("chunk_"):-len(".json")]) for n in names if n.startswith("chunk_") and n.endswith(".json")}


def _generated(log_path, job_id: str) -> list[int]:
    """Chunk indices a runtime generated for a job, from its own structured log."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("msg") == "chunk done" and record.get("job_id") == job_id:
                out.append(record["chunk"] - 1)
    return out


def test_a_runtime_killed_mid_job_is_taken_over_by_another_that_redoes_no_chunk(gpu, avatar, s3_endpoint, tmp_path):
    bucket = f"e2e-{int(time.time() * 1000)}"
    raw = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    raw.create_bucket(Bucket=bucket)
    with pg_schema() as database_url:
        shared = {"DATABASE_URL": database_url, "OUTPUT_STORE": "s3", "S3_BUCKET": bucket, "S3_ENDPOINT_URL": s3_endpoint,
                  "S3_REGION": "us-east-1", "S3_PREFIX": "avatar/", "CHUNK_CHARS": "120", **S3_ENV}
        first = runtime_proc(tmp_path / "a", gpu.url, **shared)
        second = runtime_proc(tmp_path / "b", gpu.url, **shared)
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first.start()
        try:
            with client(first.url) as http:
                task = http.post("/api/v1/generate", params={"async": "true"}, json={"text": LONG, **avatar}).json()["task_id"]
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    job = http.get(f"/api/v1/jobs/{task}").json()
                    if job["chunks_done"] >= 1 or job["status"] not in ("queued", "running"):
                        break
                    time.sleep(0.05)
            assert job["status"] == "running" and job["chunks_done"] >= 1, job
        finally:
            first.kill(signal.SIGKILL)  # mid-job: its lease stays in the record until it lapses
        total = job["chunks_total"]
        prefix = f"avatar/{task}/"
        done_by_first = _chunk_indices(raw, bucket, prefix)
        assert done_by_first and len(done_by_first) < total, (done_by_first, total)
        assert set(_generated(tmp_path / "a" / "runtime.log", task)) == done_by_first

        second.start()
        try:
            with client(second.url) as http:
                job = wait_job(http, task, timeout_s=300)
                assert job["status"] == "succeeded" and job["attempts"] == 2, job
                redirect = http.get(job["video_url"], follow_redirects=False)
                assert redirect.status_code == 307, redirect.text
                video = httpx.get(redirect.headers["location"], timeout=60)  # straight from the bucket, no API key
        finally:
            second.stop()
    # the second runtime made exactly the chunks the first had not finished, each once
    by_second = _generated(tmp_path / "b" / "runtime.log", task)
    assert sorted(by_second) == sorted(set(range(total)) - done_by_first), (by_second, done_by_first, total)

    # the video fetched through the presigned URL is the object the runtime uploaded, and a whole MP4
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    head = raw.head_object(Bucket=bucket, Key=f"{prefix}video.mp4")
    assert "-" not in head["ETag"] and head["ETag"].strip('"') == hashlib.md5(video.content).hexdigest()
    path = tmp_path / "video.mp4"
    path.write_bytes(video.content)
    lengths = stream_lengths(path)
    assert lengths["video_codec"] == "h264" and lengths["audio_codec"] == "aac", lengths
    assert lengths["video_s"] == pytest.approx(job["duration_s"], abs=0.05)
    # the chunks were scratch: once the job succeeded, only its outputs are left in the bucket
    left = sorted(o["Key"][len(prefix):] for o in raw.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"])
    assert left == ["captions.vtt", "thumbnail.jpg", "timing.json", "video.mp4"]
    assert not any((tmp_path / "b" / "runtime" / "scratch").iterdir())  # the attempt's local folder went with it
