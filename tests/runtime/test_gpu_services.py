"""Tier 3: one runtime and two real GPU services (processes on free ports): placement, affinity, failover.

The placement tests feed the runtime's selector the /health answers of the two real services;
the end-to-end tests count what each GPU service really made (its artifact folder: one WAV per
speech, one MP4 per video). The SIGKILL test runs last: it takes one service away.
"""

from __future__ import annotations

import collections
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from runtime.errors import GPUServiceError
from runtime.gpu_client import GPUClient, rendezvous_score, service_label
from runtime.settings import Settings
from tests.helpers import free_port
from tests.runtime.conftest import Proc, client, gpu_argv, runtime_proc, stream_lengths, wait_job

pytestmark = pytest.mark.slow

AVATAR = {"avatar_id": "astronaut"}  # the repository's preset, encoded by every GPU service at start
SHORT = "Hello! This avatar speaks the words you send it."
LONG = (
    "Long texts are split into sentences. The sentences are grouped into chunks of a sensible size. "
    "Each chunk becomes speech first, then video. The chunks are joined without a gap or a click. "
    "The job status shows how far the work has come. At the end there is one video file."
)
HELD = " ".join(f"Sentence number {i} keeps the only speech slot of this service busy." for i in range(60))


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> list[Proc]:
    """Two GPU services, Piper speech and no lip-sync: a with one slot per engine (one chunk fills it), b with 3."""
    procs = []
    for name, slots in (("a", 1), ("b", 3)):
        tmp = tmp_path_factory.mktemp(f"gpu_{name}")
        port = free_port()
        env = {"HOST": "127.0.0.1", "PORT": str(port), "DATA_DIR": str(tmp / "data"), "TTS_ENGINES": "piper",
               "LIPSYNC_ENGINES": "", "DEVICE": "cpu", "ENGINE_SLOTS": str(slots), "ENGINE_QUEUE": "8"}
        procs.append(Proc(f"gpu-{name}", gpu_argv(), env, f"http://127.0.0.1:{port}", tmp / "gpu.log",
                          ready_timeout_s=180))
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def runtime(services, tmp_path_factory) -> Proc:
    """A runtime placing chunks on both services (health polled every 0.3 s)."""
    proc = runtime_proc(tmp_path_factory.mktemp("rt"), services[0].url, CHUNK_CHARS="120",
                        GPU_SERVICE_URLS=",".join(s.url for s in services), GPU_HEALTH_INTERVAL_S="0.3",
                        WORKER_THREADS="2").start()
    yield proc
    proc.stop()


def made(proc: Proc) -> collections.Counter:
    """What a GPU service has made so far: its artifacts by kind (wav: speech, mp4: video)."""
    folder = Path(proc.env["DATA_DIR"]) / "artifacts"
    return collections.Counter(p.suffix.lstrip(".") for p in folder.glob("*.*") if not p.name.startswith("."))


def pool(*urls: str, **settings) -> GPUClient:
    return GPUClient(Settings(gpu_service_urls=list(urls), data_dir=Path("/nonexistent"), **settings))


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# -- the selector, on the real services' /health -----------------------------------------------------


def test_an_avatar_has_one_service_and_every_runtime_agrees_on_it(services):
    a, b = (s.url for s in services)
    gpu, reverse = pool(a, b), pool(b, a)
    try:
        answers = gpu.poll_all() + reverse.poll_all()
        assert all(ok and body["status"] == "healthy" for ok, body in answers)
        assert answers[0][1]["slots_by_capability"]["video"] == {"total": 1, "busy": 0, "free": 1, "queued": 0}
        chosen = {}
        for i in range(40):
            key = f"id:avatar-{i}"
            first = gpu.place(key, f"job-{i}")
            first.release()
            again = gpu.place(key, f"job-{i}-again")
            again.release()
            other = reverse.place(key, f"job-{i}")  # another runtime, listing the services the other way round
            other.release()
            assert first.service.base == again.service.base == other.service.base
            assert first.service.base == max((a, b), key=lambda url: rendezvous_score(key, url))
            chosen[key] = first.service.base
        assert set(chosen.values()) == {a, b}  # avatars spread over both
        # a third service that does not answer is down: no avatar moves to it, none moves between the others
        with_dead = pool(a, b, closed_url())
        try:
            with_dead.poll_all()
            assert [with_dead.state(s) for s in with_dead.services] == ["ready", "ready", "down"]
            for key, base in chosen.items():
                placed = with_dead.place(key, "j")
                placed.release()
                assert placed.service.base == base
        finally:
            with_dead.close()
    finally:
        gpu.close()
        reverse.close()


def key_preferring(url: str, other: str) -> str:
    """An avatar key whose rendezvous order puts `url` first."""
    return next(k for k in (f"id:avatar-{i}" for i in range(1000)) if rendezvous_score(k, url) > rendezvous_score(k, other))


def test_bounded_load_moves_a_second_job_off_the_avatars_service_while_it_has_free_slots(services):
    a, b = (s.url for s in services)
    gpu = pool(a, b)
    key = key_preferring(b, a)  # b: three slots, so only the bound can move a chunk off it
    try:
        gpu.poll_all()
        home = gpu.place(key, "job-1")
        assert home.service.base == b
        # the job's own chunks do not crowd it out: they run one after another
        second = gpu.place(key, "job-1")
        assert second.service is home.service
        rows = {r["service"]: r for r in gpu.report()}
        assert rows[home.service.label]["free_slots"] == 3 and rows[home.service.label]["jobs"] == 1
        # another job for the same avatar: b still has free slots, but runs more than 1.25 x the average of jobs
        spilled = gpu.place(key, "job-2")
        assert spilled.service.base == a
        # with both busy alike, the avatar's own service again (1 job each: within the bound)
        third = gpu.place(key, "job-3")
        assert third.service.base == b
        for placement in (home, second, spilled, third):
            placement.release()
        back = gpu.place(key, "job-2")  # the others are done: the avatar's own service again
        assert back.service.base == b
        back.release()
        lenient = pool(a, b, gpu_balance_factor=10.0)  # a looser bound keeps the second job home
        try:
            lenient.poll_all()
            held = [lenient.place(key, "job-1"), lenient.place(key, "job-2")]
            assert [p.service.base for p in held] == [b, b]
            for placement in held:
                placement.release()
        finally:
            lenient.close()
    finally:
        gpu.close()


def test_no_free_slot_on_the_avatars_service_moves_the_chunk_to_one_with_a_free_slot(services):
    a, b = (s.url for s in services)
    gpu = pool(a, b)
    key = key_preferring(a, b)  # a: one slot per engine
    try:
        gpu.poll_all()
        home = gpu.place(key, "job-0")
        away = next(s for s in gpu.services if s is not home.service)
        assert home.service.base == a
        home.release()
        # the home service's only speech slot really busy (a long stream, not read) and a request waiting for it
        with httpx.Client(base_url=home.service.base, timeout=120) as http:
            waiter = threading.Thread(target=lambda: http.post("/tts/generate", json={"text": "I wait my turn."}))
            with http.stream("POST", "/tts/stream", json={"text": HELD}) as held:
                next(held.iter_bytes())
                waiter.start()
                body = {}
                for _ in range(200):  # bounded: until the service's own figures show both
                    _, body = gpu.poll(home.service)
                    if body["slots_by_capability"]["tts"]["queued"] == 1:
                        break
                    time.sleep(0.05)
                assert body["slots_by_capability"]["tts"] == {"total": 1, "busy": 1, "free": 0, "queued": 1}
                gpu.poll(away)
                busy = gpu.place(key, "job-3")
                assert busy.service is away  # no free slot at home while the other has one
                busy.release()
                rows = {r["service"]: r for r in gpu.report()}
                assert rows[home.service.label]["free_slots"] < 0 < rows[away.label]["free_slots"]
            waiter.join(120)
        for _ in range(200):  # bounded: until the stream's last sentence has been given up
            _, body = gpu.poll(home.service)
            if body["slots_by_capability"]["tts"]["busy"] == 0:
                break
            time.sleep(0.05)
        idle = gpu.place(key, "job-4")
        assert idle.service is home.service
        idle.release()
    finally:
        gpu.close()


def test_a_failing_service_is_marked_down_and_its_chunk_moves_but_a_4xx_stays(services):
    from avatar_contracts.gpu import TTSRequest

    live, dead = services[0].url, closed_url()
    gpu = pool(dead, live)
    try:
        # before any poll nothing is known: the avatar's first choice is tried, here the dead one
        key = next(k for k in (f"id:x{i}" for i in range(100)) if rendezvous_score(k, dead) > rendezvous_score(k, live))
        first = gpu.place(key, "job")
        assert first.service.base == dead
        with pytest.raises(GPUServiceError) as refused:
            first.service.tts(TTSRequest(text="Hello."))
        assert refused.value.down and refused.value.transient
        moved = gpu.failover(first, refused.value, key, [first.service])
        assert moved is not None and moved.service.base == live
        assert gpu.state(first.service) == "down"
        speech = moved.service.tts(TTSRequest(text="Hello."))
        assert moved.service.fetch(speech.audio_url, "speech")[:4] == b"RIFF"  # from the service that made it
        # an input the engine refuses would be refused anywhere: never moved, the service stays ready
        gpu.poll(moved.service)
        with pytest.raises(GPUServiceError) as bad:
            moved.service.tts(TTSRequest(text="Hello.", voice="no-such-voice"))
        assert bad.value.status == 422 and not bad.value.down
        assert gpu.failover(moved, bad.value, key, [first.service, moved.service]) is None
        assert gpu.state(moved.service) == "ready"
        # nothing else to go to: the failure stands (the job backs off as with one service)
        again = gpu.place(key, "job")
        assert again.service.base == live
        assert gpu.failover(again, GPUServiceError("x", transient=True, down=True), key, [again.service]) is None
        assert gpu.state(again.service) == "down"
        gpu.poll(again.service)  # its /health answers: back in
        assert gpu.state(again.service) == "ready"
    finally:
        gpu.close()
    single = pool(dead)  # one URL, and it is down: it is still the one every chunk goes to
    try:
        single.poll_all()
        placed = single.place("id:astronaut", "job")
        assert single.state(placed.service) == "down" and placed.service.base == dead
        placed.release()
    finally:
        single.close()


# -- the runtime with both services -----------------------------------------------------------------


def test_health_and_ready_report_every_gpu_service(runtime, services):
    with client(runtime.url) as http:
        health = http.get("/health").json()
        assert health["status"] == "healthy"
        rows = {row["service"]: row for row in health["gpu_services"]}
        assert set(rows) == {service_label(s.url) for s in services}
        assert all(row["state"] == "ready" for row in rows.values()), rows
        assert [rows[service_label(s.url)]["free_slots"] for s in services] == [1, 3]
        assert health["gpu_service"]["url"] == services[0].url and health["gpu_service"]["reachable"]
        ready = http.get("/ready").json()
        assert ready["gpu_service_ready"] and ready["gpu_services_ready"] == {label: True for label in rows}


def test_consecutive_jobs_for_one_avatar_stay_on_its_service(runtime, services):
    before = [made(s) for s in services]
    with client(runtime.url) as http:
        for _ in range(3):
            resp = http.post("/api/v1/generate", json={"text": SHORT, **AVATAR})
            assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
    gained = [made(s) - b for s, b in zip(services, before)]
    # one chunk each: three speeches and three videos, all on the avatar's service, none on the other
    assert sorted((dict(g) for g in gained), key=len) == [{}, {"mp4": 3, "wav": 3}], gained


def test_a_second_job_for_a_busy_avatar_spills_to_the_other_service(runtime, services):
    before = [made(s) for s in services]
    with client(runtime.url) as http:
        first = http.post("/api/v1/generate", params={"async": "true"}, json={"text": LONG, **AVATAR}).json()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # placed: its first chunk is under way
            job = http.get(f"/api/v1/jobs/{first['task_id']}").json()
            if job["status"] == "running" and (job["detail"] or "").startswith("generating"):
                break
            time.sleep(0.05)
        second = http.post("/api/v1/generate", params={"async": "true"}, json={"text": LONG, **AVATAR}).json()
        jobs = [wait_job(http, t["task_id"], timeout_s=300) for t in (first, second)]
        assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in jobs), jobs
        rows = http.get("/health").json()["gpu_services"]
    gained = [made(s) - b for s, b in zip(services, before)]
    assert all(g["mp4"] >= 1 for g in gained), gained  # both services rendered
    assert sum(g["mp4"] for g in gained) == sum(j["chunks_total"] for j in jobs)  # and no chunk twice
    assert all(row["in_flight"] == 0 and row["jobs"] == 0 for row in rows), rows


def test_a_gpu_service_killed_mid_job_the_job_finishes_on_the_other_in_one_attempt(runtime, services, tmp_path):
    before = {s.url: made(s) for s in services}
    with client(runtime.url) as http:
        task = http.post("/api/v1/generate", params={"async": "true"}, json={"text": LONG, **AVATAR}).json()["task_id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = http.get(f"/api/v1/jobs/{task}").json()
            if job["chunks_done"] >= 1 or job["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.05)
        assert job["status"] == "running" and job["chunks_done"] >= 1, job
        rows = http.get("/health").json()["gpu_services"]
        working = [row["service"] for row in rows if row["in_flight"]]
        assert len(working) == 1, rows  # one job: on its avatar's service only
        victim = next(s for s in services if service_label(s.url) == working[0])
        survivor = next(s for s in services if s is not victim)
        victim.kill(signal.SIGKILL)
        job = wait_job(http, task, timeout_s=300)
        # done within the same attempt: the failover is not a retry of the job
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        video = http.get(job["video_url"])
        assert video.status_code == 200
        path = tmp_path / "out.mp4"
        path.write_bytes(video.content)
        lengths = stream_lengths(path)
        assert abs(lengths["video_s"] - lengths["audio_s"]) <= 0.05 and lengths["video_s"] >= 8, lengths
        rows = {row["service"]: row for row in http.get("/health").json()["gpu_services"]}
        assert rows[working[0]]["state"] == "down" and rows[working[0]]["moved_away"] >= 1, rows
        assert rows[service_label(survivor.url)]["state"] == "ready"
        assert http.get("/health").json()["status"] == "degraded"
    # one job, its chunks spread over both services: some rendered before the kill, the rest after it
    by_victim, by_survivor = (made(s)["mp4"] - before[s.url]["mp4"] for s in (victim, survivor))
    assert by_victim >= 1 and by_survivor >= 1 and by_victim + by_survivor >= job["chunks_total"]
    job_dir = Path(runtime.env["DATA_DIR"]) / "jobs" / task
    assert sorted(p.name for p in job_dir.iterdir()) == ["captions.vtt", "thumbnail.jpg", "timing.json", "video.mp4"]
