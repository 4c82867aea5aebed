"""Tier 3, live streams through the runtime: real runtime and GPU service processes (Piper speech, the
astronaut preset), the session driven only with its token. The WebRTC media itself is the browser test's
(tests/browser); here: create, say, the events as they come, capacity (429), delete (then 404).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.helpers import REPO, free_port
from tests.runtime.conftest import API_KEY, Proc, gpu_argv, runtime_proc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    port = free_port()
    env = {"HOST": "127.0.0.1", "PORT": str(port), "DATA_DIR": str(tmp / "gpu"), "TTS_ENGINES": "piper",
           "DEVICE": "cpu", "STREAM_MAX_SESSIONS": "1", "PRESET_AVATARS_DIR": str(REPO / "preset_avatars")}
    gpu = Proc("gpu", gpu_argv(), env, f"http://127.0.0.1:{port}", tmp / "gpu.log", ready_timeout_s=240).start()
    try:
        rt = runtime_proc(tmp, gpu.url).start()
    except BaseException:
        gpu.stop()
        raise
    yield gpu, rt
    rt.stop()
    gpu.stop()


def read_events(url: str, token: str, until: str, deadline_s: float, on_open=None) -> list[dict]:
    """Server-sent events of a session through the runtime until one named `until` (bounded)."""
    seen: list[dict] = []
    deadline = time.monotonic() + deadline_s
    with httpx.stream("GET", url, headers={"X-Stream-Token": token}, timeout=httpx.Timeout(deadline_s)) as resp:
        assert resp.status_code == 200, resp.read()
        if on_open:
            on_open()
        for line in resp.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                event["received_at"] = time.monotonic()
                seen.append(event)
                if event.get("event") == until:
                    return seen
            assert time.monotonic() < deadline, f"no {until} within {deadline_s} s: {seen}"
    raise AssertionError(f"the event stream ended before {until}: {seen}")


def test_say_through_the_runtime_starts_and_finishes_once_with_events_passed_on_as_they_come(services):
    gpu, rt = services
    with httpx.Client(base_url=rt.url, headers={"X-API-Key": API_KEY}, timeout=60) as http:
        made = http.post("/api/v1/stream", json={"avatar_id": "astronaut", "size": "256x256"})
        assert made.status_code == 201, made.text
        s = made.json()
    try:
        assert (s["width"], s["height"], s["fps"], s["sample_rate"]) == (256, 256, 25, 48000)
        assert s["face_box"] and all(0 <= v <= 1 for v in s["face_box"])
        assert gpu.url.split("//")[1] not in json.dumps(s)
        token = s["token"]
        said: dict = {}

        def say() -> None:
            said["at"] = time.monotonic()
            resp = httpx.post(s["say_url"], json={"text": "Hello from the runtime."}, headers={"X-Stream-Token": token},
                              timeout=30)
            assert resp.status_code == 202, resp.text
            said["utterance_id"] = resp.json()["utterance_id"]

        events = read_events(s["events_url"], token, "speech_finished", 90, on_open=say)
        speech = [e for e in events if e["event"] in ("speech_started", "speech_finished")]
        assert [(e["event"], e["utterance_id"]) for e in speech] == [
            ("speech_started", said["utterance_id"]), ("speech_finished", said["utterance_id"])]
        finished = speech[1]
        assert finished["interrupted"] is False and finished["position_s"] > 0.5
        # passed on as they came: the start arrived well before the finish, not together at the end
        assert finished["received_at"] - speech[0]["received_at"] > 0.5 * finished["position_s"]
        print(f"say -> speech_started through the runtime: {1000 * (speech[0]['received_at'] - said['at']):.0f} ms")
        interrupted = httpx.post(s["interrupt_url"], headers={"X-Stream-Token": token}, timeout=30)
        assert interrupted.status_code == 200 and interrupted.json()["interrupted"] is None
    finally:
        httpx.delete(s["stream_url"], headers={"X-Stream-Token": s["token"]}, timeout=30)


def test_past_capacity_a_429_with_retry_after_and_a_deleted_session_is_a_404(services):
    gpu, rt = services
    with httpx.Client(base_url=rt.url, headers={"X-API-Key": API_KEY}, timeout=60) as http:
        first = http.post("/api/v1/stream", json={"size": "256x256"})
        assert first.status_code == 201, first.text
        s = first.json()
        full = http.post("/api/v1/stream", json={"size": "256x256"})  # STREAM_MAX_SESSIONS=1
        assert full.status_code == 429, full.text
        assert int(full.headers["retry-after"]) >= 1 and full.json()["error_type"] == "overloaded"
        token = {"X-Stream-Token": s["token"]}
        assert httpx.delete(s["stream_url"], headers=token, timeout=30).status_code == 204
        gone = httpx.post(s["say_url"], json={"text": "Anyone?"}, headers=token, timeout=30)
        assert gone.status_code == 404 and gone.json()["error_type"] == "not_found"
        assert httpx.get(s["events_url"], headers=token, timeout=30).status_code == 404
        again = http.post("/api/v1/stream", json={"size": "256x256"})  # the place it held is free again
        assert again.status_code == 201, again.text
        assert httpx.delete(again.json()["stream_url"], headers={"X-Stream-Token": again.json()["token"]},
                            timeout=30).status_code == 204
