"""Tier 3: the real runtime and the real GPU service as processes on free ports.

Order matters only for cost: the GPU-service restart test runs last in this module.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server as http_server
import json
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.runtime.conftest import (
    API_KEY,
    WEBHOOK_SECRET,
    client,
    runtime_proc,
    stream_lengths,
    vtt_cues,
    wait_job,
)

pytestmark = pytest.mark.slow

SHORT = "Hello! This avatar speaks the words you send it."
LONG = (
    "Long texts are split into sentences. The sentences are grouped into chunks of a sensible size. "
    "Each chunk becomes speech first, then video. The chunks are joined without a gap or a click. "
    "The job status shows how far the work has come. At the end there is one video file."
)


def _check_video(http: httpx.Client, job: dict, tmp_path, min_s: float) -> dict:
    resp = http.get(job["video_url"])
    assert resp.status_code == 200 and resp.headers["content-type"] == "video/mp4"
    path = tmp_path / f"{job['task_id']}.mp4"
    path.write_bytes(resp.content)
    lengths = stream_lengths(path)
    assert lengths["video_codec"] == "h264" and lengths["audio_codec"] == "aac", lengths
    assert abs(lengths["video_s"] - lengths["audio_s"]) <= 0.05, lengths
    assert lengths["video_s"] == pytest.approx(job["duration_s"], abs=0.05)
    assert job["duration_s"] >= min_s
    data = path.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat"), "moov atom is not before mdat (no faststart)"
    return lengths


def test_sync_generate_returns_the_finished_video_captions_and_thumbnail(runtime, avatar, tmp_path):
    with client(runtime.url) as http:
        resp = http.post("/api/v1/generate", json={"text": SHORT, "language": "en", **avatar})
        assert resp.status_code == 200, resp.text
        job = resp.json()
        assert job["status"] == "succeeded" and job["task_id"] and job["video_url"].endswith("/video")
        assert {"tts", "video", "mux", "total"} <= set(job["timings"]), job["timings"]
        lengths = _check_video(http, job, tmp_path, min_s=1.5)
        vtt = http.get(job["captions_url"])
        assert vtt.status_code == 200 and vtt.text.startswith("WEBVTT")
        cues = vtt_cues(vtt.text)
        assert cues and " ".join(c[2] for c in cues) == SHORT
        timing = http.get(job["timing_url"])
        assert timing.status_code == 200 and timing.headers["content-type"] == "application/json"
        timing = timing.json()
        phones = timing["phonemes"]
        assert timing["duration_s"] == pytest.approx(job["duration_s"], abs=1e-3)
        # the speech's own timings fill the video measured from the file, less at most its padding
        assert phones[-1]["end_s"] == pytest.approx(lengths["video_s"], abs=0.1)
        assert timing["chunks"][-1]["speech_end_s"] == pytest.approx(lengths["video_s"], abs=0.1)
        assert phones[0]["start_s"] == 0.0 and all(a["end_s"] == b["start_s"] for a, b in zip(phones, phones[1:]))
        assert sum(p["phoneme"] not in ("_", " ") for p in phones) > 20
        assert " ".join(w["text"] for w in timing["words"]) == SHORT
        assert cues[0][0] == pytest.approx(timing["words"][0]["start_s"], abs=1e-3)
        assert all(a < b for a, b, _ in cues) and cues[-1][1] <= job["duration_s"] + 0.05
        thumb = http.get(job["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"


def test_async_long_text_is_chunked_with_visible_progress_and_joined(runtime, avatar, tmp_path):
    with client(runtime.url) as http:
        resp = http.post("/api/v1/generate", params={"async": "true"}, json={"text": LONG, **avatar})
        assert resp.status_code == 202, resp.text
        accepted = resp.json()
        assert set(accepted) == {"task_id", "status", "status_url"}
        seen: list[dict] = []
        job = wait_job(http, accepted["task_id"], seen=seen)
        assert job["status"] == "succeeded", job
        assert job["chunks_total"] >= 3
        partial = {s["chunks_done"] for s in seen if s["status"] == "running"}
        assert any(0 < d < job["chunks_total"] for d in partial) or len(partial) > 1, seen[-3:]
        lengths = _check_video(http, job, tmp_path, min_s=8)
        cues = vtt_cues(http.get(job["captions_url"]).text)
        assert " ".join(c[2] for c in cues) == LONG
        assert cues[-1][1] <= lengths["video_s"] + 0.05 and cues[-1][1] > lengths["video_s"] * 0.8
        timing = http.get(job["timing_url"]).json()
        chunks, phones = timing["chunks"], timing["phonemes"]
        assert len(chunks) == job["chunks_total"] and chunks[-1]["end_s"] == pytest.approx(lengths["video_s"], abs=0.05)
        assert all(a["end_s"] == b["start_s"] and a["start_s"] < a["speech_end_s"] <= a["end_s"]
                   for a, b in zip(chunks, chunks[1:]))
        assert all(a["end_s"] == b["start_s"] for a, b in zip(phones, phones[1:]))
        # each chunk's phonemes start at its offset in the joined video
        starts = {p["start_s"] for p in phones}
        assert all(c["start_s"] in starts for c in chunks)


def test_chunks_pass_their_speech_by_audio_url_and_speech_runs_ahead_of_video(gpu, avatar, tmp_path):
    from runtime import pipeline
    from runtime.gpu_client import GPUClient
    from runtime.settings import Settings

    settings = Settings(gpu_service_url=gpu.url, data_dir=tmp_path, chunk_chars=120)
    client = GPUClient(settings)
    calls: list[dict] = []

    def sent(request: httpx.Request) -> None:
        calls.append({"path": request.url.path, "start": time.perf_counter(), "end": None,
                      "body": json.loads(request.content) if request.url.path == "/video/generate" else None})

    def answered(response: httpx.Response) -> None:
        call = next(c for c in reversed(calls) if c["path"] == response.request.url.path and c["end"] is None)
        call["end"] = time.perf_counter()

    client.primary._http.event_hooks = {"request": [sent], "response": [answered]}
    try:
        result = pipeline.run(client, settings, uuid.uuid4().hex, {"text": LONG, **avatar}, lambda *_: None)
    finally:
        client.close()
    speech = [c for c in calls if c["path"] == "/tts/generate"]
    videos = [c for c in calls if c["path"] == "/video/generate"]
    assert len(speech) == len(videos) == result["chunks"] >= 3
    # the speech stays on the GPU service: each video names it, nothing is uploaded back
    assert all(v["body"].get("audio_url") and "audio" not in v["body"] for v in videos)
    # the next chunk's speech is asked for before this chunk's video is done
    assert all(s["start"] < v["end"] for s, v in zip(speech[1:], videos))


def test_background_and_face_index_reach_the_gpu_service_and_the_video(gpu, tmp_path):
    """A transparent portrait through the runtime: background and face_index go with every chunk's video request,
    and the joined video shows the background colour where the portrait is clear."""
    import base64

    import cv2
    import numpy as np

    from runtime import pipeline
    from runtime.gpu_client import GPUClient
    from runtime.settings import Settings
    from gpu_service.talking_head.video import read_frames
    from tests.helpers import REPO

    portrait = REPO / "tests" / "fixtures" / "media" / "p09_transparent_background_rgba_obama.png"
    settings = Settings(gpu_service_url=gpu.url, data_dir=tmp_path, chunk_chars=120)
    client = GPUClient(settings)
    bodies: list[dict] = []
    client.services[0]._http.event_hooks = {"request": [lambda r: bodies.append(json.loads(r.content))
                                                        if r.url.path == "/video/generate" else None]}
    job = uuid.uuid4().hex
    body = {"text": "Hello there.", "avatar_image": base64.b64encode(portrait.read_bytes()).decode(),
            "background": "#2050a0", "face_index": 0}
    try:
        pipeline.run(client, settings, job, body, lambda *_: None)
    finally:
        client.close()
    assert bodies and all(b["background"] == "#2050a0" and b["face_index"] == 0 for b in bodies)
    alpha = cv2.imread(str(portrait), cv2.IMREAD_UNCHANGED)[..., 3]
    h, w = alpha.shape[0] // 2 * 2, alpha.shape[1] // 2 * 2
    frames = read_frames((settings.jobs_dir / job / pipeline.VIDEO_NAME).read_bytes(), (w, h))
    clear = cv2.erode((alpha[:h, :w] == 0).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert np.abs(np.median(frames[:, clear].reshape(-1, 3), 0) - (0x20, 0x50, 0xA0)).max() <= 4


def test_idempotency_key_under_20_concurrent_identical_submits(runtime, avatar):
    key = f"idem-{uuid.uuid4().hex}"
    body = {"text": "Only one job is made for one key.", **avatar}
    with client(runtime.url) as http:
        before = sum(http.get("/health").json()["jobs"].values())

        def submit(_):
            return http.post("/api/v1/generate", params={"async": "true"}, json=body, headers={"Idempotency-Key": key})

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(submit, range(20)))
        assert all(a.status_code == 202 for a in answers), [a.text for a in answers if a.status_code != 202]
        ids = {a.json()["task_id"] for a in answers}
        assert len(ids) == 1
        job = wait_job(http, ids.pop())
        assert job["status"] == "succeeded" and job["attempts"] == 1
        assert sum(http.get("/health").json()["jobs"].values()) == before + 1
        again = http.post("/api/v1/generate", json=body, headers={"Idempotency-Key": key})
        assert again.status_code == 200 and again.json()["task_id"] == job["task_id"]
        other = http.post("/api/v1/generate", json={**body, "text": "Something else."}, headers={"Idempotency-Key": key})
        assert other.status_code == 409 and other.json()["error_type"] == "conflict"


class _Hooks(http_server.BaseHTTPRequestHandler):
    """Records deliveries; the very first one is answered 503 so the runtime must retry it."""

    received: list = []
    refused: list = []

    def do_POST(self):  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if not type(self).refused:
            type(self).refused.append(body)
            self.send_response(503)
        else:
            type(self).received.append((dict(self.headers), body))
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhooks_are_signed_and_failures_are_final_without_retry(runtime, avatar):
    _Hooks.received, _Hooks.refused = [], []
    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_port}/hook"
    try:
        with client(runtime.url) as http:
            ok = http.post("/api/v1/generate", params={"async": "true"}, json={"text": SHORT, "webhook_url": hook, **avatar})
            bad = http.post(
                "/api/v1/generate", params={"async": "true"},
                json={"text": SHORT, "webhook_url": hook, "voice": "no-such-voice", **avatar},
            )
            assert ok.status_code == 202 and bad.status_code == 202, (ok.text, bad.text)
            failed = wait_job(http, bad.json()["task_id"])
            assert failed["status"] == "failed" and failed["attempts"] == 1, failed
            assert "no-such-voice" in failed["reason"] and failed["error_type"]
            wait_job(http, ok.json()["task_id"])
            deadline = time.monotonic() + 30
            while len(_Hooks.received) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
        events = {}
        for headers, body in _Hooks.received:
            expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["X-Avatar-Signature"], expected)
            event = json.loads(body)
            assert headers["X-Avatar-Timestamp"] == str(event["timestamp"])
            events[event["job"]["task_id"]] = event
        assert events[ok.json()["task_id"]]["event"] == "job.succeeded"
        assert events[ok.json()["task_id"]]["job"]["video_url"].endswith("/video")
        assert events[bad.json()["task_id"]]["event"] == "job.failed"
        assert len(_Hooks.refused) == 1 and len(events) == 2  # the refused delivery was retried
    finally:
        server.shutdown()


def test_api_keys_and_error_shape(runtime, avatar):
    anon = httpx.post(f"{runtime.url}/api/v1/generate", json={"text": SHORT, **avatar})
    assert anon.status_code == 401 and anon.json()["error_type"] == "unauthorized" and anon.json()["request_id"]
    bearer = httpx.get(f"{runtime.url}/api/v1/jobs/{'0' * 32}", headers={"Authorization": f"Bearer {API_KEY}"})
    assert bearer.status_code == 404
    with client(runtime.url) as http:
        unknown = http.post("/api/v1/generate", json={"text": SHORT, "avatar_id": "no-such-avatar-xyz"})
        assert unknown.status_code == 422 and "no-such-avatar-xyz" in unknown.json()["error"]
        health = http.get("/health").json()
        assert health["gpu_service"]["reachable"] is True and health["gpu_service"]["health"]["status"] == "healthy"


def test_redis_broker_runs_the_same_jobs(gpu, avatar, tmp_path):
    redis = pytest.importorskip("redis")
    url = "redis://127.0.0.1:6379/13"
    try:
        conn = redis.Redis.from_url(url, socket_connect_timeout=1)
        conn.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Redis is not reachable at {url}: {exc}")
    proc = runtime_proc(tmp_path, gpu.url, REDIS_URL=url).start()
    try:
        with client(proc.url) as http:
            assert http.get("/health").json()["broker"] == "redis"
            resp = http.post("/api/v1/generate", json={"text": SHORT, **avatar})
            assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
    finally:
        proc.stop()
        for key in conn.scan_iter("dramatiq:*"):
            conn.delete(key)


def test_runtime_killed_with_a_queued_job_finishes_it_after_restart(gpu, avatar, tmp_path):
    # first life: the GPU service it points at is down, so the job can only wait (queued, retrying)
    dead_gpu = f"http://127.0.0.1:{_closed_port()}"
    proc = runtime_proc(tmp_path, dead_gpu).start()
    with client(proc.url) as http:
        task = http.post("/api/v1/generate", params={"async": "true"}, json={"text": SHORT, **avatar}).json()["task_id"]
        deadline = time.monotonic() + 20
        while "retry" not in (http.get(f"/api/v1/jobs/{task}").json()["detail"] or "") and time.monotonic() < deadline:
            time.sleep(0.1)
    proc.kill(signal.SIGKILL)
    proc.start(GPU_SERVICE_URL=gpu.url)  # same data dir and port, the GPU service reachable now
    try:
        with client(proc.url) as http:
            job = wait_job(http, task)
            assert job["status"] == "succeeded", job
            assert http.get(job["video_url"]).status_code == 200
    finally:
        proc.stop()
    outputs = list((tmp_path / "runtime" / "jobs").rglob("*.mp4"))
    assert [p.name for p in outputs] == ["video.mp4"]


def test_a_sync_request_waiting_on_a_job_does_not_hold_shutdown(tmp_path):
    # the GPU service is down, so the job only retries; the sync request would wait SYNC_TIMEOUT_S
    proc = runtime_proc(tmp_path, f"http://127.0.0.1:{_closed_port()}", SYNC_TIMEOUT_S="120").start()
    answers: list = []

    def submit() -> None:
        with client(proc.url) as http:
            answers.append(http.post("/api/v1/generate", json={"text": SHORT, "avatar_id": "astronaut"}))

    waiting = threading.Thread(target=submit)
    waiting.start()
    with client(proc.url) as http:
        deadline = time.monotonic() + 20
        while not http.get("/health").json()["jobs"] and time.monotonic() < deadline:
            time.sleep(0.1)
    time.sleep(1.0)  # the job exists: the request is inside its wait
    started = time.monotonic()
    proc.kill(signal.SIGTERM)  # waits for the exit (SIGKILL after 15 s)
    stopped_in = time.monotonic() - started
    waiting.join(10)
    assert stopped_in < 8, f"shutdown took {stopped_in:.1f} s"
    assert answers and answers[0].status_code == 202, answers
    assert answers[0].json()["status_url"].endswith(answers[0].json()["task_id"])


def _closed_port() -> int:
    from tests.helpers import free_port

    return free_port()


def test_gpu_service_killed_mid_job_then_restarted_the_job_completes_once(runtime, gpu, avatar, tmp_path):
    with client(runtime.url) as http:
        task = http.post("/api/v1/generate", params={"async": "true"}, json={"text": LONG, **avatar}).json()["task_id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = http.get(f"/api/v1/jobs/{task}").json()
            if job["chunks_done"] >= 1 or job["status"] != "queued" and job["status"] != "running":
                break
            time.sleep(0.05)
        assert job["status"] == "running" and job["chunks_done"] >= 1, job
        gpu.kill(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while "retry" not in (http.get(f"/api/v1/jobs/{task}").json()["detail"] or "") and time.monotonic() < deadline:
            time.sleep(0.1)
        waiting = http.get(f"/api/v1/jobs/{task}").json()
        assert waiting["status"] in ("queued", "running") and "retry" in (waiting["detail"] or ""), waiting
        gpu.start()
        job = wait_job(http, task)
        assert job["status"] == "succeeded" and job["attempts"] >= 2, job
        _check_video(http, job, tmp_path, min_s=8)
    job_dir = runtime.env["DATA_DIR"] + f"/jobs/{task}"
    import pathlib

    assert sorted(p.name for p in pathlib.Path(job_dir).iterdir()) == ["captions.vtt", "thumbnail.jpg", "timing.json", "video.mp4"]
