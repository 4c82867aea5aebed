"""Tier 2: the GPU service app in process (ASGI transport), with the real Piper engine."""

from __future__ import annotations

import asyncio
import base64
import io
import numpy as np
import pytest
import soundfile as sf

from gpu_service.device import probe
from tests.conftest import running_app


def run(coro):
    """Run one async scenario to completion."""
    return asyncio.run(coro)


def test_health_ready_and_speech_roundtrip(gpu_settings):
    async def scenario():
        async with running_app(gpu_settings) as client:
            health = (await client.get("/health")).json()
            assert health["status"] == "healthy" and health["device"] == "cpu"
            cuda, mps, _ = probe()  # what the host has, reported whatever device the service uses
            assert health["capabilities"] == {"cuda": cuda, "mps": mps}
            assert health["models"]["tts"] is True
            assert health["available_slots"] >= 1 and health["active_workers"] == 0
            piper = next(e for e in health["engines"] if e["name"] == "piper")
            assert piper["voices"] == ["en_US-joe-medium"] and piper["languages"] == ["en"]
            assert piper["device"] == "cpu" and piper["providers"] == ["CPUExecutionProvider"]

            resp = await client.post("/tts/generate", json={"text": "Good morning, my friend."})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["success"] and body["engine"] == "piper" and body["voice"] == "en_US-joe-medium"
            assert body["sample_rate"] == 22050 and body["device"] == "cpu"
            assert body["audio_url"].startswith("http://gpu.test/artifacts/") and not body["audio_url"].startswith("/")
            assert body["phonemes"][-1]["end_s"] == pytest.approx(body["duration_s"], abs=0.02)
            wav = await client.get(body["audio_url"])
            assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
            audio, rate = sf.read(io.BytesIO(wav.content))
            assert rate == 22050 and len(audio) / rate == pytest.approx(body["duration_s"], abs=0.01)

            direct = await client.post(
                "/tts/generate", json={"text": "Good morning, my friend."}, headers={"Accept": "audio/wav"}
            )
            assert direct.status_code == 200 and direct.content[:4] == b"RIFF"
            assert float(direct.headers["X-Duration-S"]) == pytest.approx(body["duration_s"], rel=0.2)  # Piper samples durations

    run(scenario())


def _b64_wav(seconds: float, amp: float = 0.3) -> str:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (amp * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


BAD_REQUESTS = [
    ({"text": ""}, 422, "text is empty"),
    ({"text": "   \n\t "}, 422, "text is empty"),
    ({"text": "a" * 5001}, 422, "maximum is 5000"),
    ({"text": "hi", "engine": "nope"}, 422, "valid engines"),
    ({"text": "hi", "voice": "nobody"}, 422, "valid voices"),
    ({"text": "hi", "language": "xx"}, 422, "languages of engine"),
    ({"text": "hi", "engine": "xtts"}, 422, "xtts"),
    ({"text": "hi", "speaker_wav": "%%%"}, 422, "speaker_wav is not valid base64"),
    ({"text": "hi", "speaker_wav": base64.b64encode(b"plain text, no audio").decode()}, 422, "not a readable audio"),
    ({"text": "hi", "speaker_wav": _b64_wav(0.2)}, 422, "at least 1 s"),
    ({"text": "hi", "speaker_wav": _b64_wav(40)}, 422, "at most 30 s"),
    ({"text": "hi", "speed": 9}, 422, "speed"),
    ({"text": "hi", "colour": "red"}, 422, "unknown field 'colour'"),
    ({"language": "en"}, 422, "text"),
]


def test_bad_requests_get_named_4xx_and_service_stays_healthy(gpu_settings, tmp_path):
    gpu_settings.tts_engines = ["piper", "xtts"]
    gpu_settings.avatar_model_dir = tmp_path / "no-models"

    async def scenario():
        async with running_app(gpu_settings) as client:
            for body, status, needle in BAD_REQUESTS:
                resp = await client.post("/tts/generate", json=body)
                assert resp.status_code == status, (body, resp.text)
                err = resp.json()
                assert needle in err["error"], (body, err)
                assert err["error_type"] and len(err["request_id"]) >= 16
                assert resp.headers["X-Request-ID"] == err["request_id"]
                assert "Traceback" not in resp.text
                assert (await client.get("/health")).json()["status"] == "healthy"
            assert (await client.post("/tts/generate", json={"text": "Still speaking."})).status_code == 200

    run(scenario())


def test_transport_errors_and_unavailable_engine(gpu_settings, tmp_path):
    gpu_settings.tts_engines = ["piper", "xtts"]
    gpu_settings.avatar_model_dir = tmp_path / "no-models"
    gpu_settings.max_request_bytes = 4096

    async def scenario():
        async with running_app(gpu_settings) as client:
            resp = await client.post("/tts/generate", content=b'{"text": "hi"', headers={"content-type": "application/json"})
            assert resp.status_code == 422 and "not valid JSON" in resp.json()["error"]
            resp = await client.post("/tts/generate", content=b"text=hi", headers={"content-type": "text/plain"})
            assert resp.status_code == 415 and "application/json" in resp.json()["error"]
            resp = await client.post("/tts/generate", json={"text": "word " * 2000})
            assert resp.status_code == 413 and "limit is 4096" in resp.json()["error"]
            health = (await client.get("/health")).json()
            xtts = next(e for e in health["engines"] if e["name"] == "xtts")
            assert xtts["available"] is False and "xtts" in xtts["reason"].lower()
            resp = await client.post("/tts/generate", json={"text": "hi", "engine": "xtts"})
            assert resp.status_code == 422 and resp.json()["error_type"] == "engine_unavailable"
            assert (await client.get("/artifacts/0123456789abcdef0123456789abcdef.wav")).status_code == 404
            assert (await client.get("/ready")).status_code == 200

    run(scenario())


def test_ready_rechecks_each_engine_and_names_the_one_that_fails(gpu_settings, monkeypatch):
    from dataclasses import replace

    async def scenario():
        async with running_app(gpu_settings) as client:
            assert (await client.get("/ready")).status_code == 200
            piper = client.app.state.registry.speech["piper"].engine
            healthy = piper.health()
            # The engine's own check turns bad after start (a lost device, a dead session): /ready must see it.
            monkeypatch.setattr(piper, "health", lambda: replace(healthy, available=False, reason="session lost"))
            resp = await client.get("/ready")
            assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
            body = resp.json()
            assert body["ready"] is False and body["engine"] == "piper" and body["capability"] == "tts"
            assert "piper" in body["reason"] and "session lost" in body["reason"]
            assert (await client.get("/health")).json()["status"] == "unhealthy"
            monkeypatch.undo()
            assert (await client.get("/ready")).status_code == 200

    run(scenario())


def test_stream_is_one_valid_wav_of_the_whole_text(gpu_settings):
    # httpx's ASGI transport buffers bodies, so the timing of first bytes is checked in the process tier.
    text = " ".join(["Streaming speech arrives sentence by sentence, so a listener hears it early."] * 6)

    async def scenario():
        async with running_app(gpu_settings) as client:
            resp = await client.post("/tts/stream", json={"text": text})
            assert resp.status_code == 200 and resp.headers["content-type"] == "audio/wav"
            data = resp.content
            assert data[:4] == b"RIFF" and data[36:40] == b"data"
            pcm = np.frombuffer(data[44:], dtype="<i2").astype(np.float32) / 32767
            assert len(pcm) / 22050 > 20 and np.sqrt(np.mean(pcm**2)) > 0.02
            bad = await client.post("/tts/stream", json={"text": " "})
            assert bad.status_code == 422 and "text is empty" in bad.json()["error"]

    run(scenario())


def test_overload_gives_429_with_retry_after(gpu_settings):
    gpu_settings.engine_slots = 1
    gpu_settings.engine_queue = 0
    text = "This request keeps the only slot busy for a little while, long enough for others to arrive."

    async def scenario():
        async with running_app(gpu_settings) as client:
            results = await asyncio.gather(*[client.post("/tts/generate", json={"text": text}) for _ in range(3)])
            codes = sorted(r.status_code for r in results)
            assert codes[0] == 200 and 429 in codes, codes
            refused = next(r for r in results if r.status_code == 429)
            assert refused.headers["Retry-After"] == "1" and refused.json()["error_type"] == "overloaded"
            assert (await client.post("/tts/generate", json={"text": "still fine"})).status_code == 200

    run(scenario())


def test_health_counts_the_slots_that_run_and_the_requests_that_wait(gpu_settings):
    gpu_settings.engine_slots = 1
    gpu_settings.engine_queue = 4
    text = " ".join(["This sentence is long enough to keep the only speech slot busy for a while."] * 4)

    async def scenario():
        async with running_app(gpu_settings) as client:
            idle = (await client.get("/health")).json()
            assert idle["slots_by_capability"]["tts"] == {"total": 1, "busy": 0, "free": 1, "queued": 0}
            assert idle["slots"]["free"] == idle["available_slots"] == idle["slots"]["total"]
            work = asyncio.gather(*[client.post("/tts/generate", json={"text": text}) for _ in range(3)])
            seen = []
            for _ in range(600):  # bounded: until all three have been answered
                if work.done():
                    break
                seen.append((await client.get("/health")).json()["slots_by_capability"]["tts"])
                await asyncio.sleep(0.02)
            answers = await work
            assert all(a.status_code == 200 for a in answers)
            # one runs, two wait: the figure a client placing work reads
            assert {"total": 1, "busy": 1, "free": 0, "queued": 2} in seen, seen[:5]
            after = (await client.get("/health")).json()["slots_by_capability"]["tts"]
            assert after == {"total": 1, "busy": 0, "free": 1, "queued": 0}

    run(scenario())


def test_unexpected_failure_is_a_500_with_request_id_and_no_trace(gpu_settings):
    import shutil

    async def scenario():
        async with running_app(gpu_settings) as client:
            # a real fault: a file where the artifact folder was, under the running service (a folder that
            # merely vanished is made again: test_an_artifact_folder_removed_under_a_running_service_is_made_again)
            shutil.rmtree(gpu_settings.artifacts_dir)
            gpu_settings.artifacts_dir.write_bytes(b"")
            resp = await client.post("/tts/generate", json={"text": "Where did my disk go?"})
            assert resp.status_code == 500
            body = resp.json()
            assert body["error_type"] == "internal_error" and body["request_id"] in body["error"]
            assert "Traceback" not in resp.text and "Error" not in body["error"]
            assert (await client.get("/health")).json()["status"] == "healthy"
            ok = await client.post("/tts/generate", json={"text": "Still here."}, headers={"Accept": "audio/wav"})
            assert ok.status_code == 200

    run(scenario())


def test_failures_that_will_recur_are_424_generation_failed(gpu_settings, monkeypatch, tmp_path):
    """A failure a retry cannot fix is 424 (as TGI answers), so the runtime fails the job instead of retrying it."""
    import cv2
    from skimage import data

    from gpu_service.errors import GenerationFailed
    from gpu_service.talking_head import video

    ok, portrait = cv2.imencode(".png", np.ascontiguousarray(data.astronaut()[..., ::-1]))
    broken_ffmpeg = tmp_path / "ffmpeg"
    broken_ffmpeg.write_text("#!/bin/sh\necho 'libx264: cannot allocate encoder' >&2\nexit 1\n")
    broken_ffmpeg.chmod(0o755)

    async def scenario():
        async with running_app(gpu_settings) as client:
            piper = client.app.state.registry.speech["piper"].engine

            def no_audio(request):
                raise GenerationFailed("XTTS produced no audio for this text")

            monkeypatch.setattr(piper, "synthesize", no_audio)
            speech = await client.post("/tts/generate", json={"text": "Nothing comes out."})
            monkeypatch.undo()
            monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(broken_ffmpeg))  # a real encoder failure
            clip = await client.post("/video/generate", json={"avatar_image": base64.b64encode(portrait.tobytes()).decode(),
                                                              "audio": _b64_wav(1.0)})
            monkeypatch.undo()
            health = (await client.get("/health")).json()
            return speech, clip, health

    speech, clip, health = run(scenario())
    for resp, words in ((speech, "produced no audio"), (clip, "video encoding failed")):
        assert resp.status_code == 424, resp.text
        body = resp.json()
        assert body["error_type"] == "generation_failed" and words in body["error"]
        assert body["request_id"] == resp.headers["X-Request-ID"] and "Traceback" not in resp.text
    assert health["status"] == "healthy"


def test_slow_file_and_decoding_work_leaves_the_event_loop_free(gpu_settings, monkeypatch):
    """Writing artifacts and decoding uploads run in threads: /health is answered while they are slow.

    Not a timing threshold: the slow calls record when they sleep, and some /health answer must
    arrive inside that window. A call made on the event loop would block every answer until it returns.
    """
    import time as _time

    import cv2
    from skimage import data

    from gpu_service import artifacts as artifacts_module
    from gpu_service.talking_head import service as talking_head_service

    windows: dict[str, list[tuple[float, float]]] = {"put": [], "decode": []}

    def slow(name, fn):
        def wrapper(*args, **kwargs):
            started = _time.monotonic()
            _time.sleep(1.5)  # a slow disk, a long clip
            windows[name].append((started, _time.monotonic()))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(artifacts_module.ArtifactStore, "put", slow("put", artifacts_module.ArtifactStore.put))
    monkeypatch.setattr(talking_head_service, "decode_audio", slow("decode", talking_head_service.decode_audio))
    portrait = base64.b64encode(cv2.imencode(".png", np.ascontiguousarray(data.astronaut()[..., ::-1]))[1]).decode()

    async def health_times(client, work) -> tuple[list[float], object]:
        """When each /health answer arrived while `work` ran."""
        task = asyncio.ensure_future(work)
        answered = []
        while not task.done():
            assert (await client.get("/health")).status_code == 200
            answered.append(_time.monotonic())
            await asyncio.sleep(0.05)
        return answered, await task

    def answered_inside(times: list[float], name: str) -> bool:
        return any(start + 0.2 < t < end - 0.2 for start, end in windows[name] for t in times)

    async def scenario():
        async with running_app(gpu_settings) as client:
            put_times, tts = await health_times(client, client.post("/tts/generate", json={"text": "Saved slowly."}))
            body = {"avatar_image": portrait, "audio": _b64_wav(1.0), "response": "json"}
            decode_times, video = await health_times(client, client.post("/video/generate", json=body))
            return tts, put_times, video, decode_times

    tts, put_times, video, decode_times = run(scenario())
    assert tts.status_code == 200 and video.status_code == 200, (tts.text, video.text)
    assert windows["put"] and windows["decode"], windows
    assert answered_inside(put_times, "put"), "no /health answer while an artifact was being written"
    assert answered_inside(decode_times, "decode"), "no /health answer while an upload was being decoded"


def test_a_stream_that_fails_midway_is_aborted_not_ended_cleanly(gpu_settings, monkeypatch):
    """A later sentence failing must not look like the end of the speech: the chunked body is cut off."""
    import logging
    from dataclasses import replace

    import httpx

    from gpu_service.errors import GenerationFailed
    from tests.conftest import serving_app

    text = "The first sentence is spoken. The second one fails. The third is never reached."
    records: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("gpu_service").addHandler(catcher)
    try:
        with serving_app(gpu_settings) as url, httpx.Client(timeout=60) as client:
            piper = serving_app.app.state.registry.speech["piper"].engine
            real = piper.stream

            def fails_on_the_second_sentence(request):
                yield from real(replace(request, text=request.text.split(". ")[0] + "."))
                raise GenerationFailed("sentence 2 could not be synthesized")

            monkeypatch.setattr(piper, "stream", fails_on_the_second_sentence)
            received = bytearray()
            with pytest.raises(httpx.RemoteProtocolError, match="incomplete"):
                with client.stream("POST", f"{url}/tts/stream", json={"text": text},
                                   headers={"X-Request-ID": "stream-fails-0001"}) as resp:
                    assert resp.status_code == 200
                    for piece in resp.iter_bytes():
                        received += piece
            assert len(received) > 44 + 22050  # the first sentence did arrive
            monkeypatch.undo()
            assert client.post(f"{url}/tts/generate", json={"text": "Still here."}).status_code == 200
    finally:
        logging.getLogger("gpu_service").removeHandler(catcher)
    aborted = [r for r in records if getattr(r, "request_id", None) == "stream-fails-0001"]
    assert aborted and getattr(aborted[0], "why", "") == "sentence 2 could not be synthesized"
    assert getattr(aborted[0], "error_type", "") == "generation_failed"


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(gpu_settings):
    """No Content-Length to check: the bytes are counted as they come, and the rest is never read."""
    import time as _time

    import httpx

    from tests.conftest import serving_app

    gpu_settings.max_request_bytes = 1024 * 1024
    sent = {"json": 0, "lipsync": 0}

    def body(key: str, total: int, head: bytes = b""):
        piece = b"x" * (256 * 1024)
        yield head
        sent[key] += len(head)
        while sent[key] < total:
            yield piece
            sent[key] += len(piece)

    with serving_app(gpu_settings) as url, httpx.Client(timeout=60) as client:
        started = _time.monotonic()
        resp = client.post(f"{url}/tts/generate", content=body("json", 64 * 1024 * 1024, b'{"text": "'),
                           headers={"content-type": "application/json"})
        elapsed = _time.monotonic() - started
        assert resp.status_code == 413, resp.text[:300]
        err = resp.json()
        assert err["error_type"] == "payload_too_large" and "limit is 1048576" in err["error"]
        assert err["request_id"] == resp.headers["X-Request-ID"]
        # Refused at the limit: the client did not get to send (and the server to hold) the 64 MB.
        assert sent["json"] < 16 * 1024 * 1024 and elapsed < 20, (sent, elapsed)
        # Lip-sync keeps its own, larger limit: 3 MB of upload pass the 1 MB service-wide one.
        boundary = "b0undary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"v.mp4\"\r\n"
                "Content-Type: video/mp4\r\n\r\n").encode()

        def form():
            yield from body("lipsync", 3 * 1024 * 1024, head)
            yield f"\r\n--{boundary}--\r\n".encode()

        resp = client.post(f"{url}/lipsync/generate", content=form(),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert resp.status_code == 422 and "payload" not in resp.json()["error_type"], resp.text[:300]
        assert client.post(f"{url}/tts/generate", json={"text": "Still serving."}).status_code == 200


def test_no_server_path_reaches_a_client(gpu_settings, tmp_path):
    """Health reports and error answers name settings ($AVATAR_MODEL_DIR/...), never the server's directories."""
    from tests.helpers import REPO

    gpu_settings.tts_engines = ["piper", "xtts"]
    gpu_settings.avatar_model_dir = tmp_path / "models"  # no weights in it
    how = "put the XTTS-v2 files in $AVATAR_MODEL_DIR/xtts_v2/ (config.json, model.pth, vocab.json)"

    async def scenario():
        async with running_app(gpu_settings) as client:
            health = await client.get("/health")
            xtts = next(e for e in health.json()["engines"] if e["name"] == "xtts")
            assert how in xtts["reason"], xtts
            answers = [
                await client.post("/tts/generate", json={"text": "hi", "engine": "xtts"}),
                await client.post("/tts/stream", json={"text": "hi", "engine": "xtts"}),
                await client.post("/video/generate", json={"avatar_id": "nobody", "audio": _b64_wav(1.0)}),
                await client.post("/video/generate", json={"avatar_id": "x", "audio_url": "/artifacts/" + "0" * 32 + ".wav"}),
                await client.get("/artifacts/" + "0" * 32 + ".mp4"),
                await client.post("/avatars", files={"image": ("x.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")}),
                await client.post("/lipsync/generate", files={"video": ("v.mp4", b"\x00" * 2048, "video/mp4"),
                                                              "audio": ("a.wav", b"RIFF" + b"\x00" * 100, "audio/wav")}),
            ]
            return [health, await client.get("/ready")] + answers

    answers = run(scenario())
    assert answers[2].status_code == 422 and how in answers[2].json()["error"]
    assert all(400 <= r.status_code < 500 for r in answers[2:]), [(r.status_code, r.text) for r in answers[2:]]
    for resp in answers:
        for root in (str(tmp_path), str(REPO)):
            assert root not in resp.text, (resp.request.url, resp.text)
