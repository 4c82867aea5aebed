"""Tier 1-2 of the runtime: pure units and the app in process (no GPU service needed)."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import sys
import threading
import time
import uuid

import numpy as np
import pytest
import sqlalchemy
from pydantic import ValidationError

from runtime.captions import align_words, spoken_words, to_webvtt
from runtime.db import JobStore, key_fingerprint, request_hash
from runtime.errors import Conflict, ValidationFailed
from runtime.media import fit_audio
from runtime.pipeline import speech_timeline
from runtime.settings import Settings
from avatar_contracts.text import chunk_text, split_sentences
from runtime.webhooks import check_target, sign, verify


def _png() -> str:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()[::4, ::4]).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# -- text ---------------------------------------------------------------------------------------


def test_sentences_respect_abbreviations_and_initials():
    text = "Dr. Smith met J. R. Tolkien. Did he?  Yes!\n\"Quite so.\" The end"
    assert split_sentences(text) == ["Dr. Smith met J. R. Tolkien.", "Did he?", "Yes!", '"Quite so."', "The end"]


def test_chunks_group_whole_sentences_and_lose_nothing():
    sentences = [f"Sentence number {i} says something useful about the weather." for i in range(80)]
    text = " ".join(sentences)
    chunks = chunk_text(text, 300)
    assert len(chunks) > 5
    assert " ".join(chunks) == text
    assert all(len(c) <= 300 for c in chunks)
    assert all(c.endswith(".") for c in chunks)  # never cut mid-sentence


def test_an_endless_sentence_is_cut_at_spaces_within_bounds():
    text = ", ".join(["word"] * 1000) + "."
    chunks = chunk_text(text, 200)
    assert all(len(c) <= 400 for c in chunks)
    assert " ".join(chunks).replace(" ", "") == text.replace(" ", "")


# -- captions -----------------------------------------------------------------------------------


def _phones(words: list[list[str]], step: float = 0.1) -> list[dict]:
    out, t = [{"phoneme": "_", "start_s": 0.0, "end_s": 0.2}], 0.2
    for i, word in enumerate(words):
        if i:
            out.append({"phoneme": " ", "start_s": t, "end_s": t})
        for ph in word:
            out.append({"phoneme": ph, "start_s": t, "end_s": t + step})
            t += step
    out.append({"phoneme": "_", "start_s": t, "end_s": t + 0.2})
    return out


def test_words_take_the_engine_timings_and_the_chunk_offset():
    phones = _phones([["h", "ɛ", "l", "oʊ"], ["w", "ɜː", "l", "d"]])
    assert spoken_words(phones) == [pytest.approx((0.2, 0.6)), pytest.approx((0.6, 1.0))]
    words = align_words("Hello world.", phones, offset_s=10.0, duration_s=1.2)
    assert [(w.text, round(w.start_s, 3), round(w.end_s, 3)) for w in words] == [("Hello", 10.2, 10.6), ("world.", 10.6, 11.0)]
    vtt = to_webvtt(words)
    assert vtt.startswith("WEBVTT\n\n1\n00:00:10.200 --> 00:00:11.000\nHello world.")


def test_mismatched_word_counts_spread_over_the_spoken_span():
    phones = _phones([["t", "uː"], ["θ", "aʊ"], ["z", "ə", "n", "d"]])
    words = align_words("2000 cats.", phones, offset_s=0.0, duration_s=1.5)
    assert len(words) == 2 and words[0].start_s == pytest.approx(0.2) and words[-1].end_s == pytest.approx(1.0)


def test_a_two_chunk_timeline_is_shifted_by_each_chunks_video_and_tiles_it():
    # chunk 0: 1.2 s of speech cut to its 26 frames (1.04 s); chunk 1: 0.9 s of speech padded to 34 frames (1.36 s)
    first = {"index": 0, "text": "Hello world.", "frames": 26, "fps": 25,
             "phonemes": _phones([["h", "ɛ", "l", "oʊ"], ["w", "ɜː", "l", "d"]])}
    second = {"index": 1, "text": "Bye mum.", "frames": 34, "fps": 25,
              "phonemes": _phones([["b", "aɪ"], ["m", "ʌ", "m"]])}
    timeline = speech_timeline([first, second])
    assert timeline["fps"] == 25 and timeline["duration_s"] == pytest.approx(60 / 25)
    phones = timeline["phonemes"]
    # contiguous from 0 to the end of the video, in order
    assert phones[0]["start_s"] == 0.0 and phones[-1]["end_s"] == pytest.approx(2.4)
    assert all(a["end_s"] == pytest.approx(b["start_s"]) for a, b in zip(phones, phones[1:]))
    spoken = [(p["phoneme"], p["start_s"], p["end_s"]) for p in phones if p["phoneme"] not in ("_", " ")]
    # chunk 0 as the engine timed it; its closing pause cut where its video ends
    assert spoken[:8] == [(ph, pytest.approx(0.2 + 0.1 * i), pytest.approx(0.3 + 0.1 * i))
                          for i, ph in enumerate(["h", "ɛ", "l", "oʊ", "w", "ɜː", "l", "d"])]
    assert {"phoneme": "_", "start_s": 1.0, "end_s": 1.04} in phones
    # chunk 1 starts at 26/25 s: "b" at 1.04 + 0.2; its closing pause runs on over the padding to the end
    assert spoken[8:] == [(ph, pytest.approx(1.24 + 0.1 * i), pytest.approx(1.34 + 0.1 * i))
                          for i, ph in enumerate(["b", "aɪ", "m", "ʌ", "m"])]
    assert phones[-1] == {"phoneme": "_", "start_s": 1.74, "end_s": 2.4}
    assert timeline["chunks"] == [{"index": 0, "start_s": 0.0, "end_s": 1.04, "speech_end_s": 1.04},
                                  {"index": 1, "start_s": 1.04, "end_s": 2.4, "speech_end_s": 1.94}]
    # the words are the captions' words, shifted the same way
    assert [(w["text"], w["start_s"], w["end_s"]) for w in timeline["words"]] == [
        ("Hello", 0.2, 0.6), ("world.", 0.6, 1.0), ("Bye", 1.24, 1.44), ("mum.", 1.44, 1.74)]


def test_a_chunk_without_engine_phonemes_gets_none_invented():
    silent = {"index": 0, "text": "Hello there.", "frames": 25, "fps": 25, "phonemes": []}
    timeline = speech_timeline([silent])
    assert timeline["phonemes"] == [] and timeline["chunks"][0]["speech_end_s"] is None
    assert [w["text"] for w in timeline["words"]] == ["Hello", "there."]


# -- audio joins --------------------------------------------------------------------------------


def test_fit_audio_pads_trims_and_fades_edges():
    tone = np.ones(1000, dtype=np.float32)
    padded = fit_audio(tone, 1000, 1.5)
    assert len(padded) == 1500 and padded[0] == 0.0 and padded[999] == pytest.approx(0.0) and padded[500] == 1.0
    assert np.all(padded[1000:] == 0)
    trimmed = fit_audio(tone, 1000, 0.5)
    assert len(trimmed) == 500 and trimmed[250] == 1.0


# -- webhooks -----------------------------------------------------------------------------------


def test_signature_is_hmac_sha256_of_the_raw_body():
    import hashlib
    import hmac

    body = b'{"event":"job.succeeded"}'
    secret = "s" * 32
    assert sign(body, secret) == "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert verify(body, secret, sign(body, secret))
    assert not verify(body + b" ", secret, sign(body, secret))


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x", "http://localhost/x", "http://10.1.2.3/", "http://169.254.169.254/latest",
                                 "http://[::1]/", "http://192.168.0.1/"])
def test_private_webhook_targets_are_refused(url):
    settings = Settings(webhook_secret="x" * 32)
    with pytest.raises(ValidationFailed, match="non-public"):
        check_target(url, settings)


def test_webhook_allow_list_and_schemes():
    allowed = Settings(webhook_secret="x" * 32, webhook_allowed_hosts="127.0.0.1")
    check_target("http://127.0.0.1:9/hook", allowed)
    with pytest.raises(ValidationFailed, match="http"):
        check_target("ftp://example.com/x", allowed)
    with pytest.raises(ValidationFailed, match="not a valid URL"):  # checked again at delivery: never a crash
        check_target("http://[::1", allowed)
    with pytest.raises(ValidationFailed, match="WEBHOOK_SECRET"):
        check_target("http://127.0.0.1:9/hook", Settings(webhook_allow_private=True))


# -- settings -----------------------------------------------------------------------------------


def test_settings_are_bounded_and_parse_lists(monkeypatch):
    monkeypatch.setenv("RUNTIME_API_KEYS", "alpha, beta")
    monkeypatch.setenv("REDIS_URL", "")
    settings = Settings()
    assert settings.runtime_api_keys == ["alpha", "beta"] and settings.redis_url is None
    assert settings.port == 8000 and settings.gpu_service_url == "http://127.0.0.1:8001"
    with pytest.raises(Exception):
        Settings(port=70000)
    with pytest.raises(Exception):
        Settings(gpu_service_url="ftp://x")
    missing = [name for name, field in Settings.model_fields.items() if not field.description and name not in _documented()]
    assert not missing, f"undocumented settings: {missing}"


def test_one_gpu_service_url_or_a_list_of_them(monkeypatch):
    from pydantic import ValidationError

    assert Settings().gpu_urls == ["http://127.0.0.1:8001"]  # the embedded default: one service
    assert Settings(gpu_service_url="http://gpu:8001/").gpu_urls == ["http://gpu:8001"]
    monkeypatch.setenv("GPU_SERVICE_URLS", "http://10.0.0.5:8001, http://10.0.0.6:8001/")
    assert Settings(gpu_service_url="http://ignored:1").gpu_urls == ["http://10.0.0.5:8001", "http://10.0.0.6:8001"]
    monkeypatch.setenv("GPU_SERVICE_URLS", '["https://a.example", "http://b:8001"]')
    assert Settings().gpu_urls == ["https://a.example", "http://b:8001"]
    monkeypatch.setenv("GPU_SERVICE_URLS", "")  # as compose writes an unset variable: the one URL again
    assert Settings().gpu_urls == ["http://127.0.0.1:8001"]
    monkeypatch.delenv("GPU_SERVICE_URLS")
    with pytest.raises(ValidationError, match="'ftp://a' is not an http"):
        Settings(gpu_service_urls="http://ok:1,ftp://a")
    with pytest.raises(ValidationError, match="listed more than once: http://a:1"):
        Settings(gpu_service_urls="http://a:1,http://a:1/")


def test_service_labels_and_affinity_keys():
    from runtime.gpu_client import affinity_key, service_label

    assert service_label("http://user:secret@10.0.0.5:8001/prefix") == "10.0.0.5:8001"
    assert service_label("https://gpu.example") == "gpu.example:443" and service_label("http://[::1]:9") == "[::1]:9"
    assert affinity_key("astronaut", None) == "id:astronaut"
    image = affinity_key(None, "aGVsbG8=")
    assert image.startswith("image:") and image == affinity_key(None, "aGVsbG8=") != affinity_key(None, "aGk=")


def _documented() -> set[str]:
    """Fields with a docstring under them in settings.py (how this codebase documents settings)."""
    import ast
    import inspect

    import runtime.settings as mod

    tree = ast.parse(inspect.getsource(mod))
    names: set[str] = set()
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings").body
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            names.add(stmt.target.id)
    return names


# -- the job store (each test on SQLite and on PostgreSQL: the db_url fixture) ------------------


def sql(store: JobStore, statement: str) -> None:
    """Run raw SQL on the store's database (a test reaching past the API, e.g. to make a lease lapse)."""
    with store.engine.begin() as conn:
        conn.execute(sqlalchemy.text(statement))


def test_idempotency_is_enforced_by_a_unique_constraint_under_concurrency(db_url):
    store = JobStore(db_url)
    body = {"text": "hello", "avatar_id": "a"}
    results, errors = [], []
    barrier = threading.Barrier(20)

    def submit(i: int) -> None:
        barrier.wait()
        try:
            with JobStore(db_url) as own:  # 20 stores opening (and migrating) at once, then racing the insert
                results.append(own.create(f"{i:032x}", body, "key-1"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(created for _, created in results) == 1
    assert len({row["id"] for row, _ in results}) == 1
    assert store.count_idempotent("key-1") == 1
    with pytest.raises(Conflict, match="different body"):
        store.create("f" * 32, {**body, "text": "other"}, "key-1")
    with pytest.raises(sqlalchemy.exc.IntegrityError):  # the constraint itself lives in the schema
        sql(store, "INSERT INTO jobs (id, idempotency_key, request_hash, request_json, status,"
                   " created_at, updated_at) VALUES ('z', 'key-1', 'h', '{}', 'queued', 0, 0)")
    store.close()


def test_request_hash_ignores_key_order():
    assert request_hash({"a": 1, "b": [1, 2]}) == request_hash({"b": [1, 2], "a": 1})


def test_leases_decide_who_runs_a_job(db_url):
    store = JobStore(db_url)
    store.create("a" * 32, {"text": "x"}, None)
    first = store.claim("a" * 32, "w1", lease_s=60)
    assert first and first["status"] == "running" and first["attempts"] == 1
    assert store.claim("a" * 32, "w2", lease_s=60) is None  # live lease elsewhere
    # a second message for it in w1's own process: another of w1's threads runs it, so it is not started twice
    assert store.claim("a" * 32, "w1", lease_s=60) is None and store.get("a" * 32)["attempts"] == 1
    assert store.progress("a" * 32, "w1", 1, 3, "chunk 2 of 3")
    assert not store.progress("a" * 32, "w2", 1, 3, "chunk 2 of 3")
    sql(store, "UPDATE jobs SET lease_until = 0")  # w1 died: its lease lapses
    second = store.claim("a" * 32, "w2", lease_s=60)
    assert second and second["attempts"] == 2
    assert not store.succeed("a" * 32, "w1", {"duration_s": 1})  # the dead owner cannot finish it
    assert store.succeed("a" * 32, "w2", {"duration_s": 1})
    assert store.claim("a" * 32, "w3", lease_s=60) is None  # finished jobs are never taken again
    assert store.get("a" * 32)["status"] == "succeeded"
    store.close()


def test_an_abandoned_attempt_cannot_fail_a_job_the_reaper_put_back(db_url):
    store = JobStore(db_url)
    store.create("c" * 32, {"text": "x"}, None)
    store.claim("c" * 32, "w1", lease_s=60)
    sql(store, "UPDATE jobs SET lease_until = 0")  # w1 stalled; the reaper puts the job back for another
    assert [s.job_id for s in store.take_stalled(time.time(), 0)] == ["c" * 32]
    assert not store.fail("c" * 32, "w1 gave up", "internal_error", owner="w1")
    assert store.get("c" * 32)["status"] == "queued"
    assert store.fail("c" * 32, "cancelled by an operator", "cancelled")  # no owner given: any unfinished job
    store.close()


def test_release_requeues_and_fail_records_the_reason(db_url):
    store = JobStore(db_url)
    store.create("b" * 32, {"text": "x"}, None)
    store.claim("b" * 32, "w1", 60)
    assert store.release("b" * 32, "w1", "waiting")
    assert store.get("b" * 32)["status"] == "queued"
    assert [r["id"] for r in store.unfinished()] == ["b" * 32]
    assert store.fail("b" * 32, "speech: 422 bad voice", "validation_error")
    row = store.get("b" * 32)
    assert row["status"] == "failed" and row["reason"] == "speech: 422 bad voice"
    assert store.unfinished() == []
    store.close()


OLD_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, request_hash TEXT NOT NULL, request_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    chunks_done INTEGER NOT NULL DEFAULT 0, chunks_total INTEGER NOT NULL DEFAULT 0, detail TEXT, reason TEXT,
    error_type TEXT, attempts INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_until REAL, result_json TEXT,
    webhook_url TEXT, base_url TEXT, webhook_state TEXT, webhook_attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL
);
CREATE INDEX jobs_status ON jobs (status);
INSERT INTO jobs (id, idempotency_key, request_hash, request_json, status, created_at, updated_at)
    VALUES ('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'order-7', 'h', '{"text": "old"}', 'succeeded', 1, 1);
"""


def test_a_job_database_from_before_ownership_is_migrated_in_place(tmp_path):
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
    store = JobStore(path)
    old = store.get("a" * 32)
    assert old["request_json"] == '{"text": "old"}' and old["owner"] is None
    # the old table-wide UNIQUE is gone: another API key may use the same idempotency key
    row, created = store.create("b" * 32, {"text": "new"}, "order-7", owner=key_fingerprint("k1"))
    assert created and row["owner"] == key_fingerprint("k1")
    assert store.create("c" * 32, {"text": "new"}, "order-7", owner=key_fingerprint("k1")) == (row, False)
    JobStore(path)  # opening a migrated file again changes nothing
    assert store.counts() == {"succeeded": 1, "queued": 1}


# -- the app in process (boundary validation; no GPU service is running) ------------------------


@pytest.fixture
def client(app_client):
    with app_client() as c:
        yield c


def _png_b64() -> str:
    """A small valid PNG (64x64 grey) as base64, for requests whose other fields are under test."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"".join(b"\x00" + b"\x80" * 64 for _ in range(64)))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"text": "", "avatar_id": "a"}, 422, "text is empty"),
        ({"text": "   ", "avatar_id": "a"}, 422, "text is empty"),
        ({"text": "x" * 501, "avatar_id": "a"}, 422, "maximum is 500"),
        ({"text": "hi", "avatar_id": "a", "avatar_image": "aGk="}, 422, "both"),
        ({"text": "hi", "avatar_image": "not base64!"}, 422, "not valid base64"),
        ({"text": "hi", "avatar_image": base64.b64encode(b"GIF89a....").decode()}, 422, "not a JPEG, PNG or WebP"),
        ({"text": "hi", "avatar_id": "a", "speaker_wav": base64.b64encode(b"hello").decode()}, 422, "speaker_wav"),
        ({"text": "hi", "avatar_id": "a", "webhook_url": "ftp://example.com/x"}, 422, "http(s)"),
        ({"text": "hi", "avatar_id": "a", "webhook_url": "http://127.0.0.1:1/x"}, 422, "non-public"),
        ({"text": "hi", "avatar_id": "a", "emotion": "bored"}, 422, "emotion"),
        ({"text": "hi", "avatar_id": "a", "language": "english!"}, 422, "language"),
        ({"text": "hi", "avatar_id": "a", "avatar": "x"}, 422, "unknown field 'avatar'"),
        ({"text": 5, "avatar_id": "a"}, 422, "text"),
        ({"text": "hi", "avatar_image": _png_b64(), "background": "#12345"}, 422, "background '#12345' is not a colour"),
        ({"text": "hi", "avatar_image": _png_b64(), "background": "white"}, 422, "background is not valid base64"),
        ({"text": "hi", "avatar_image": _png_b64(), "background": base64.b64encode(b"GIF89a....").decode()}, 422,
         "background is not a JPEG, PNG or WebP image"),
        ({"text": "hi", "avatar_id": "a", "background": "#ffffff"}, 422, "background applies to avatar_image"),
        ({"text": "hi", "avatar_id": "a", "face_index": 1}, 422, "face_index applies to avatar_image"),
        ({"text": "hi", "avatar_image": _png_b64(), "face_index": 64}, 422, "face_index"),
        ({"text": "hi", "avatar_image": _png_b64(), "face_index": -1}, 422, "face_index"),
    ],
)
def test_bad_input_is_refused_before_any_job_exists(client, body, status, fragment):
    resp = client.post("/api/v1/generate", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()
    assert fragment in err["error"] and err["error_type"] and err["request_id"]
    assert client.app.state.runtime.store.counts() == {}


def test_oversized_malformed_and_wrongly_typed_bodies(client):
    big = client.post("/api/v1/generate", content=b"x" * 300_000, headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error_type"] == "payload_too_large"
    assert client.post("/api/v1/generate", content=b"{", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/api/v1/generate", content=b"[]", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/api/v1/generate", content=b"text=hi", headers={"content-type": "text/plain"}).status_code == 415


def test_api_keys_are_enforced_on_api_routes_only(client):
    anon = client.get("/api/v1/jobs/" + "0" * 32, headers={"X-API-Key": ""})
    assert anon.status_code == 401 and anon.json()["error_type"] == "unauthorized"
    wrong = client.get("/api/v1/jobs/" + "0" * 32, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401
    bearer = client.get("/api/v1/jobs/" + "0" * 32, headers={"X-API-Key": "", "Authorization": "Bearer k2"})
    assert bearer.status_code == 404 and bearer.json()["error_type"] == "not_found"
    assert client.get("/health", headers={"X-API-Key": ""}).status_code == 200


def test_health_reports_an_unreachable_gpu_service_and_ready_is_about_the_runtime(client):
    health = client.get("/health").json()
    assert health["gpu_service"]["reachable"] is False and health["status"] == "degraded"
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["gpu_service_ready"] is False


def test_a_valid_async_submit_is_queued_and_waits_for_the_gpu_service(client):
    resp = client.post("/api/v1/generate?async=true", json={"text": "Hello there.", "avatar_image": _png()})
    assert resp.status_code == 202, resp.text
    job = client.get(resp.json()["status_url"].replace("http://testserver", "")).json()
    assert job["status"] in ("queued", "running") and job["video_url"] is None
    assert job["timing_url"] is None
    for output in ("video", "timing.json"):
        early = client.get(f"/api/v1/jobs/{job['task_id']}/{output}")
        assert early.status_code == 409 and early.json()["error_type"] == "conflict"
    assert client.get(f"/api/v1/jobs/{'0' * 32}/timing.json").status_code == 404
    assert client.get(f"/api/v1/jobs/{job['task_id']}/timing.json", headers={"X-API-Key": ""}).status_code == 401


def test_the_runtime_never_imports_torch_or_the_gpu_service():
    import subprocess

    code = "import sys, runtime.app, runtime.jobs, runtime.__main__; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'gpu_service'))))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_redis_namespace_keeps_one_deployments_jobs_under_its_own_keys(tmp_path):
    from runtime.jobs import Runtime

    assert Settings(redis_url="redis://127.0.0.1:6379/0").redis_namespace == "dramatiq"  # Dramatiq's own default
    with pytest.raises(ValidationError):
        Settings(redis_namespace="has space")
    redis = pytest.importorskip("redis")
    url = "redis://127.0.0.1:6379/0"
    conn = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        conn.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Redis is not reachable at {url}: {exc}")
    namespace = f"t-{uuid.uuid4().hex[:12]}"
    rt = Runtime(Settings(data_dir=tmp_path, redis_url=url, redis_namespace=namespace, run_worker=False))
    try:
        rt.enqueue("e" * 32)
        assert conn.llen(f"{namespace}:avatar_jobs") == 1  # the message sits under this deployment's prefix only
    finally:
        rt.stop()
        for key in conn.scan_iter(f"{namespace}:*"):
            conn.delete(key)


def test_a_short_first_chunk_lets_speech_run_ahead():
    text = "Good morning, and welcome to the update. " + " ".join(f"Sentence {i} carries on for a while here." for i in range(10))
    chunks = chunk_text(text, 400, first_chars=60)
    assert chunks[0] == "Good morning, and welcome to the update."
    assert all(len(c) <= 400 for c in chunks[1:]) and " ".join(chunks) == text


def test_reaper_resends_a_job_whose_worker_vanished(tmp_path, db_url):
    from runtime.jobs import Runtime

    rt = Runtime(Settings(data_dir=tmp_path, database_url=None if db_url.startswith("sqlite") else db_url,
                          run_worker=False, job_lease_s=2, retry_max_backoff_s=1))
    try:
        def taken_over() -> float:
            return rt.metrics.registry.get_sample_value("avatar_runtime_job_retries_total", {"reason": "lease_expired"})

        rt.store.create("c" * 32, {"text": "x"}, None)
        rt.store.claim("c" * 32, "dead-worker", lease_s=60)
        assert rt.reap() == 0  # its lease is live: leave it alone
        sql(rt.store, "UPDATE jobs SET lease_until = 1")
        assert rt.reap() == 1
        assert rt.broker.queues["avatar_jobs"].qsize() == 1
        assert rt.store.get("c" * 32)["status"] == "queued" and rt.reap() == 0  # handed out once, not every sweep
        # a take-over is a retry by lease expiry, counted here: the claim that follows finds the job queued
        assert taken_over() == 1
        sql(rt.store, "UPDATE jobs SET updated_at = 1")  # now it sat queued too long (its message lost): re-sent,
        assert rt.reap() == 1 and taken_over() == 1  # but no worker died
    finally:
        rt.stop()


def test_a_second_message_for_a_job_its_own_runtime_is_running_does_not_start_it_again(tmp_path, db_url):
    from runtime.jobs import Runtime

    # nothing listens at the GPU URL: an attempt that did start would fail there and put the job back to queued
    rt = Runtime(Settings(data_dir=tmp_path, database_url=None if db_url.startswith("sqlite") else db_url,
                          run_worker=False, gpu_service_url="http://127.0.0.1:9"))
    try:
        job_id = "f" * 32
        rt.store.create(job_id, {"text": "Hello there.", "avatar_id": "astronaut"}, None)
        assert rt.store.claim(job_id, rt.owner, lease_s=60)  # one of this runtime's threads is running it
        rt._run_job(job_id)  # the duplicate delivery (a reaper's re-send of a long-queued job)
        row = rt.store.get(job_id)
        assert (row["status"], row["lease_owner"], row["attempts"]) == ("running", rt.owner, 1)
    finally:
        rt.stop()


def test_gpu_client_classifies_failures_and_reads_retry_after(tmp_path):
    import http.server

    from runtime.errors import GPUServiceError
    from runtime.gpu_client import GPUClient, ServiceClient
    from runtime.jobs import Runtime
    from tests.helpers import free_port

    answers = {"/tts/generate": (429, {"Retry-After": "7"}, b'{"error":"busy","error_type":"overloaded"}'),
               "/video/generate": (422, {}, b'{"error":"no face found","error_type":"bad_media"}'),
               "/avatars": (503, {}, b"down")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            status, headers, body = answers[self.path]
            self.send_response(status)
            for k, v in {**headers, "Content-Type": "application/json"}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    gpu = ServiceClient(url, Settings(avatar_cache_s=0))
    try:
        from avatar_contracts.gpu import TTSRequest, VideoRequest

        with pytest.raises(GPUServiceError) as busy:
            gpu.tts(TTSRequest(text="hi"))
        assert busy.value.transient and busy.value.status == 429 and busy.value.retry_after_s == 7.0
        with pytest.raises(GPUServiceError) as bad:
            gpu.video(VideoRequest(avatar_id="a", audio="aGk="))
        assert not bad.value.transient and "no face found" in bad.value.message and bad.value.error_type == "bad_media"
        assert busy.value.status == 429 and not busy.value.down  # busy, not failing: it stays in placement
        assert gpu.avatar_ids() is None  # 5xx: cannot tell, so the submit is not refused for it
        pool = GPUClient(Settings(gpu_service_url=url, avatar_cache_s=0))
        assert pool.avatar_ids() is None
        pool.close()
    finally:
        server.shutdown()
        gpu.close()
    down = ServiceClient(f"http://127.0.0.1:{free_port()}", Settings())
    with pytest.raises(GPUServiceError) as refused:
        down.tts(TTSRequest(text="hi"))
    assert refused.value.transient and refused.value.down and "unreachable" in refused.value.message
    rt = Runtime(Settings(data_dir=tmp_path, run_worker=False, retry_min_backoff_s=0.5, retry_max_backoff_s=4))
    try:
        assert [rt._backoff_s(n, None) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
        assert rt._backoff_s(1, 7.0) == 7.0  # Retry-After wins over a shorter backoff
    finally:
        rt.stop()
