"""The video endpoints in process: presets at start, real Piper speech to MP4, and a 4xx for each bad input."""

from __future__ import annotations

import asyncio
import base64
import io

import cv2
import numpy as np
import pytest
import soundfile as sf
from skimage import data

from avatar_contracts.probe import probe
from gpu_service.talking_head.video import read_frames
from tests.conftest import running_app


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    assert ok
    return buf.tobytes()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def wav_b64(seconds: float) -> str:
    t = np.arange(int(seconds * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32), 16000, format="WAV")
    return b64(buf.getvalue())


@pytest.fixture
def video_settings(gpu_settings, tmp_path):
    presets = gpu_settings.preset_avatars_dir
    (presets / "astro").mkdir(parents=True)
    (presets / "astro" / "portrait.png").write_bytes(png(data.astronaut()))
    (presets / "broken").mkdir()
    (presets / "broken" / "face.jpg").write_bytes(b"not a jpeg at all")
    (presets / "empty").mkdir()
    limits = gpu_settings.talking_head.model_copy(update={"max_image_bytes": 2 * 1024 * 1024, "max_audio_s": 20.0})
    return gpu_settings.model_copy(update={"talking_head": limits})


def test_presets_speech_to_mp4_and_json(video_settings):
    async def scenario():
        async with running_app(video_settings) as client:
            health = (await client.get("/health")).json()
            assert health["models"]["video"] is True
            avatars = (await client.get("/avatars")).json()
            assert [a["avatar_id"] for a in avatars] == ["astro"]  # the broken and empty presets were skipped
            assert avatars[0]["preset"] and avatars[0]["image_size"] == [512, 512]

            tts = (await client.post("/tts/generate", json={"text": "Hello there, I build rockets."})).json()
            resp = await client.post("/video/generate", json={"avatar_id": "astro", "audio_url": tts["audio_url"],
                                                              "phonemes": tts["phonemes"], "head_motion": False})
            assert resp.status_code == 200, resp.text
            assert resp.headers["content-type"] == "video/mp4"
            info = probe(resp.content)
            assert (info.video_codec, info.pix_fmt, info.width, info.height) == ("h264", "yuv420p", 512, 512)
            assert info.audio_codec == "aac"
            assert info.duration_s == pytest.approx(tts["duration_s"], abs=0.05)
            assert int(resp.headers["X-Frames"]) == round(tts["duration_s"] * 25)
            assert resp.content[:64].find(b"ftyp") >= 0 and resp.content.find(b"moov") < resp.content.find(b"mdat")
            frames = read_frames(resp.content, (512, 512))
            assert len(frames) == round(tts["duration_s"] * 25)
            x0, y0, x1, y1 = 20, 300, 120, 500  # background, far from the face: as the portrait (up to codec loss)
            assert np.abs(frames[:, y0:y1, x0:x1].astype(int) - data.astronaut()[y0:y1, x0:x1]).mean() < 4

            # An inline portrait, base64 audio, no audio track, JSON answer with an artifact URL.
            cam = np.stack([data.camera()] * 3, -1)
            resp = await client.post("/video/generate", json={"avatar_image": b64(png(cam)), "audio": wav_b64(1.0),
                                                              "include_audio": False, "fps": 20, "response": "json"})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["frames"] == 20 and body["fps"] == 20 and body["width"] == 512 and body["device"] == "cpu"
            assert body["avatar_id"].startswith("img_") and body["timings_ms"]["total"] > 0
            video = await client.get(body["video_url"])
            assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
            assert probe(video.content).audio_codec is None

            # Upload, list, use, delete.
            up = await client.post("/avatars", files={"image": ("cam.png", png(cam), "image/png")})
            assert up.status_code == 200, up.text
            cam_id = up.json()["avatar_id"]
            assert cam_id == body["avatar_id"] and up.json()["cached"] is True  # same image: encoded once
            assert cam_id in [a["avatar_id"] for a in (await client.get("/avatars")).json()]
            assert (await client.delete(f"/avatars/{cam_id}")).status_code == 200
            assert (await client.post("/video/generate", json={"avatar_id": cam_id, "audio": wav_b64(1.0)})).status_code == 404

    asyncio.run(scenario())


def test_each_bad_input_gets_its_4xx(video_settings):
    astro = data.astronaut()
    face = astro[30:250, 130:330]
    two = np.ascontiguousarray(np.concatenate([face, face[:, ::-1]], axis=1))  # two faces side by side
    tiny = cv2.resize(astro, (160, 160), interpolation=cv2.INTER_AREA)
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    big = np.random.default_rng(1).integers(0, 255, (1100, 1100, 3), dtype=np.uint8)

    async def upload(client, raw, **form):
        return await client.post("/avatars", files={"image": ("x.png", raw, "image/png")}, data=form)

    async def scenario():
        async with running_app(video_settings) as client:
            cases = [
                (await upload(client, png(noise)), 422, "no face"),
                (await upload(client, png(two), face_index="2"), 422, "face_index=2 but 2 faces were found"),
                (await upload(client, png(tiny)), 422, "too small"),
                (await upload(client, b"hello, not an image"), 422, "not a JPEG, PNG or WebP image"),
                (await upload(client, png(big)), 422, "limit"),
            ]
            ok = await upload(client, png(two), pick_largest="true")
            assert ok.status_code == 200, ok.text
            audio = wav_b64(1.0)
            gen = lambda body: client.post("/video/generate", json=body)  # noqa: E731
            cases += [
                (await gen({"avatar_id": "nobody", "audio": audio}), 404, "unknown avatar_id"),
                (await gen({"avatar_id": "../../etc/passwd", "audio": audio}), 422, "invalid"),
                (await gen({"avatar_id": "astro", "audio": ""}), 422, "empty"),
                (await gen({"avatar_id": "astro", "audio": b64(b"RIFF....garbage")}), 422, "not a readable audio"),
                (await gen({"avatar_id": "astro", "audio": wav_b64(21.0)}), 422, "at most 20"),
                (await gen({"avatar_id": "astro", "audio_url": "http://evil.example/x.wav"}), 422, "audio_url must be"),
                (await gen({"avatar_id": "astro", "audio_url": "/artifacts/" + "0" * 32 + ".wav"}), 404, "does not exist"),
                (await gen({"avatar_id": "astro", "audio": audio, "emotion": "smug"}), 422, "unknown emotion"),
                (await gen({"audio": audio}), 422, "exactly one of avatar_id or avatar_image"),
                (await gen({"avatar_image": b64(png(noise)), "audio": audio}), 422, "no face"),
                (await client.delete("/avatars/astro"), 422, "preset"),
            ]
            for resp, status, words in cases:
                assert resp.status_code == status, (words, resp.text)
                assert words in resp.json()["error"], (words, resp.text)

    asyncio.run(scenario())


def bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height grey pixels (the data holds a few zero rows)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + width) * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_from_its_header(video_settings):
    """A small file claiming 12000x12000 pixels is refused by its header, wherever an image enters."""
    import resource

    bomb = bomb_png(12000, 12000)  # 144 MP: 432 MB once decoded to RGB
    assert len(bomb) < 64 * 1024

    async def scenario():
        async with running_app(video_settings) as client:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            upload = await client.post("/avatars", files={"image": ("bomb.png", bomb, "image/png")})
            inline = await client.post("/video/generate", json={"avatar_image": b64(bomb), "audio": wav_b64(1.0)})
            grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
            return upload, inline, grown_mb

    upload, inline, grown_mb = run_scenario(scenario())
    for resp, field in ((upload, "image"), (inline, "avatar_image")):
        assert resp.status_code == 422, resp.text
        assert resp.json()["error_type"] == "bad_media"
        assert f"{field} is 12000x12000 pixels (144000000 in all); the limit is 40000000" in resp.json()["error"]
    assert grown_mb < 200, f"memory grew by {grown_mb:.0f} MB"


def run_scenario(coro):
    """Run one async scenario to completion."""
    return asyncio.run(coro)


def test_two_full_size_faces_are_counted_and_one_can_be_chosen(video_settings):
    """Two portraits side by side: both found, the largest taken by default, face_index picks one by size and an
    index past them is a 422 saying how many there are."""
    astro = data.astronaut()
    pair = np.ascontiguousarray(np.concatenate([astro, astro[:, ::-1]], axis=1))  # 1024x512, a face in each half

    async def upload(client, **form):
        return await client.post("/avatars", files={"image": ("pair.png", png(pair), "image/png")}, data=form)

    async def scenario():
        async with running_app(video_settings) as client:
            return [await upload(client), await upload(client, face_index="0"), await upload(client, face_index="1"),
                    await upload(client, face_index="2"), await upload(client, pick_largest="true")]

    plain, first, second, beyond, largest = run_scenario(scenario())
    for resp in (plain, first, second, largest):
        assert resp.status_code == 200, resp.text
    assert plain.json() == {**first.json(), "cached": plain.json()["cached"], "encode_time_ms": plain.json()["encode_time_ms"]}
    assert largest.json()["avatar_id"] == plain.json()["avatar_id"]  # pick_largest, kept for older clients, is the default
    boxes = sorted([first.json()["face_box"], second.json()["face_box"]])  # one face in each half
    assert boxes[0][0] + boxes[0][2] <= 512 < boxes[1][0]
    area = lambda box: box[2] * box[3]  # noqa: E731
    assert area(first.json()["face_box"]) >= area(second.json()["face_box"])  # by size, largest first
    assert first.json()["avatar_id"] != second.json()["avatar_id"]  # one image, two avatars
    assert beyond.status_code == 422, beyond.text
    assert "face_index=2 but 2 faces were found in the image" in beyond.json()["error"], beyond.text
