"""Tier 2: POST /lipsync/generate in process on real media: a talking-head clip re-voiced with other Piper speech."""

from __future__ import annotations

import asyncio
import io
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from evaluator.metrics.face import measure_frames, read_video
from evaluator.metrics.sync import av_offset, lip_audio_correlation, speech_envelope
from avatar_contracts.probe import probe
from gpu_service.talking_head.video import read_frames
from tests.conftest import running_app
from tests.lipsync.conftest import BLANK_FRAMES


@pytest.fixture
def lipsync_settings(tmp_path: Path):
    """Piper for /tts (the service's readiness needs it) and the landmark lip-sync engine; no talking head."""
    from gpu_service.settings import Settings

    return Settings(device="cpu", tts_engines=["piper"], video_engines=[], lipsync_engines=["landmark"], data_dir=tmp_path / "data",
                    preset_avatars_dir=tmp_path / "presets")


def run(coro):
    """Run one async scenario to completion."""
    return asyncio.run(coro)


def _files(video: Path, audio: Path | None = None, **fields) -> dict:
    files = {"video": (video.name, video.read_bytes(), "video/mp4")}
    if audio is not None:
        files["audio"] = (audio.name, audio.read_bytes(), "audio/wav")
    return {"files": files, "data": {k: str(v) for k, v in fields.items()}}


def test_revoiced_mouth_follows_the_new_speech(lipsync_settings, media, tmp_path):
    phones = [{"phoneme": p, "start_s": s, "end_s": e} for p, s, e in media["phones_b"]]

    async def scenario():
        async with running_app(lipsync_settings) as client:
            health = (await client.get("/health")).json()
            assert health["models"]["lipsync"] is True
            return await client.post("/lipsync/generate", **_files(media["a"], media["b_wav"], phonemes=json.dumps(phones)))

    resp = run(scenario())
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "video/mp4"
    dur_b = len(media["audio_b"]) / media["sr_b"]
    n_expected = round(dur_b * 25)
    assert int(resp.headers["X-Frames"]) == n_expected > len(media["a_frames"])  # B is longer: pingpong
    assert int(resp.headers["X-Frames-Without-Face"]) == 0
    assert resp.headers["X-Length-Policy"] == "pingpong"
    out = tmp_path / "out.mp4"
    out.write_bytes(resp.content)
    info = probe(resp.content)
    assert (info.video_codec, info.pix_fmt, info.width, info.height) == ("h264", "yuv420p", 320, 320)
    assert info.audio_codec == "aac"
    assert info.duration_s == pytest.approx(dur_b, abs=0.08)
    assert resp.content.find(b"moov") < resp.content.find(b"mdat")  # faststart

    frames, fps, _ = read_video(str(out), with_audio=False)
    assert fps == 25.0 and len(frames) == n_expected and frames.shape[1:] == (320, 320, 3)
    track = measure_frames(frames)
    assert track.found.all()
    gap = track.mouth_gap
    env_new = speech_envelope(media["audio_b"], media["sr_b"], fps, len(gap))
    # The old speech, laid out as the source frames were (pingpong), is what the mouth would follow if it leaked.
    from gpu_service.lipsync.stream_io import source_index

    env_a = speech_envelope(media["audio_a"], media["sr_a"], fps, len(media["a_frames"]))
    env_old = env_a[[source_index(i, len(env_a), "pingpong") for i in range(len(gap))]]
    off = av_offset(gap, env_new, fps)
    corr_new = lip_audio_correlation(gap, env_new, fps)
    corr_old = lip_audio_correlation(gap, env_old, fps)
    print(f"lag={off.lag_frames} corr_new={corr_new:.3f} corr_old={corr_old:.3f}")
    assert abs(off.lag_frames) <= 1
    assert corr_new > 0.5 and corr_new > corr_old + 0.3
    # The mouth really closes and opens on the new speech (not a frozen or faint copy of the old one), by
    # as much as real talkers do (their inner-lip gap peaks at 0.035-0.11 face heights; speech is driven to 0.08).
    assert np.percentile(gap, 10) < 0.045 and np.percentile(gap, 90) - np.percentile(gap, 10) > 0.035


def test_face_free_frames_pass_through_and_are_counted(lipsync_settings, media):
    async def scenario():
        async with running_app(lipsync_settings) as client:
            return await client.post("/lipsync/generate", **_files(media["holed"], media["b_wav"], length_policy="trim",
                                                                   response="json"))

    resp = run(scenario())
    assert resp.status_code == 200, resp.text
    body = resp.json()
    n_src = len(media["holed_frames"])
    assert body["frames"] == n_src and body["length_policy"] == "trim"  # B is longer; trim keeps the video's length
    assert body["frames_without_face"] == len(BLANK_FRAMES)
    assert body["width"] == 320 and body["height"] == 320 and body["fps"] == 25.0


def test_face_free_frames_unchanged_in_the_output(media, tmp_path):
    """Engine level (no HTTP): the blank frames come out as they went in, up to H.264 re-encoding."""
    from gpu_service.lipsync.protocol import LipSyncJob
    from gpu_service.lipsync.engines.landmark import LandmarkLipSync
    from gpu_service.lipsync.stream_io import open_video

    eng = LandmarkLipSync()
    eng.load("cpu")
    src = open_video(media["holed"], max_s=60, max_pixels=10**6)
    res = eng.lipsync(LipSyncJob(video=src, audio=media["audio_b"], sample_rate=media["sr_b"], length_policy="trim"))
    out = read_frames(res.mp4, (320, 320))
    src_frames = read_frames(media["holed"].read_bytes(), (320, 320))
    for i in BLANK_FRAMES:
        assert np.abs(out[i].astype(int) - src_frames[i].astype(int)).mean() < 1.5
    # ...while frames with a face were re-rendered around the mouth.
    changed = [np.abs(out[i].astype(int) - src_frames[i].astype(int)).max() for i in range(5, 15)]
    assert max(changed) > 40


def test_policies_and_audio_url(lipsync_settings, media):
    async def scenario():
        async with running_app(lipsync_settings) as client:
            tts = (await client.post("/tts/generate", json={"text": "A short line that is longer than the clip, I hope so."})).json()
            loop = await client.post("/lipsync/generate", **_files(media["a"], audio_url=tts["audio_url"],
                                                                   length_policy="loop", fps=20))
            return tts, loop

    tts, loop = run(scenario())
    assert loop.status_code == 200, loop.text
    assert int(loop.headers["X-Frames"]) == round(tts["duration_s"] * 20)
    assert loop.headers["X-Fps"] == "20" and loop.headers["X-Length-Policy"] == "loop"


def _wav_bytes(audio, rate) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_bad_inputs_get_clear_4xx(lipsync_settings, media, tmp_path):
    a, wav = media["a"], media["b_wav"]
    silent = tmp_path / "silent.wav"
    silent.write_bytes(_wav_bytes(np.zeros(22050, np.float32), 22050))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    notaudio = tmp_path / "notaudio.ogg"
    notaudio.write_text("this is text\n" * 100)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(a.read_bytes()[:700])
    ffv1 = media["transcode"]("ffv1.mkv", "-c:v", "ffv1", "-an")
    webm = media["transcode"]("a.webm", "-c:v", "libvpx", "-deadline", "realtime", "-b:v", "800k", "-an")
    cases = [
        (_files(wav, wav), 422, "no video stream"),
        (_files(truncated, wav), 422, "not a readable media file"),
        (_files(media["noface"], wav), 422, "no face found in any"),
        (_files(a, silent), 422, "silent"),
        (_files(a, empty), 422, "audio is empty"),
        (_files(a, notaudio), 422, "not an audio file"),
        (_files(ffv1, wav), 415, "ffv1"),
        (_files(a), 422, "exactly one of"),
        (_files(a, wav, audio_url="http://example.com/x.wav"), 422, "exactly one of"),
        ({"files": {"video": ("a.mp4", a.read_bytes(), "video/mp4")}, "data": {"audio_url": "http://evil.test/a.wav"}},
         422, "audio_url must be"),
        (_files(a, wav, length_policy="bounce"), 422, "length_policy must be one of"),
        (_files(a, wav, silence="keep"), 422, "silence must be one of filmed, rendered"),
        (_files(a, wav, fps="fast"), 422, "fps must be a number"),
        (_files(a, wav, phonemes="[{\"phoneme\": \"a\"}]"), 422, "phonemes must be"),
        (_files(a, wav, colour="red"), 422, "unknown form field"),
    ]

    async def scenario():
        async with running_app(lipsync_settings) as client:
            answers = [await client.post("/lipsync/generate", **case) for case, _, _ in cases]
            answers.append(await client.post("/lipsync/generate", json={"video": "x"}))
            ok_webm = await client.post("/lipsync/generate", **_files(webm, wav, length_policy="trim"))
            return answers, ok_webm

    answers, ok_webm = run(scenario())
    for (case, status, words), resp in zip(cases, answers):
        assert resp.status_code == status, (words, resp.status_code, resp.text)
        assert words in resp.json()["error"], (words, resp.text)
    assert answers[-1].status_code == 415 and "multipart/form-data" in answers[-1].json()["error"]
    assert ok_webm.status_code == 200, ok_webm.text  # WebM (VP8) is a supported input
    assert ok_webm.headers["X-Frames"] == str(len(media["a_frames"]))


def test_limits_past_size_and_duration(tmp_path, media):
    from gpu_service.settings import Settings

    tight = Settings(device="cpu", tts_engines=["piper"], video_engines=[], data_dir=tmp_path / "data",
                     preset_avatars_dir=tmp_path / "presets",
                     lipsync={"max_audio_bytes": 64 * 1024, "max_video_s": 1.5, "max_audio_s": 2.0})
    short_wav = tmp_path / "short.wav"  # under the byte limit, over the 2 s duration limit
    short_wav.write_bytes(_wav_bytes(media["audio_b"][::4][: int(2.5 * media["sr_b"] / 4)], media["sr_b"] // 4))
    assert short_wav.stat().st_size < 64 * 1024
    clip1s = media["transcode"]("a1s.mp4", "-t", "1.0")

    async def scenario():
        async with running_app(tight) as client:
            big = await client.post("/lipsync/generate", **_files(media["a"], media["b_wav"]))
            long_video = await client.post("/lipsync/generate", **_files(media["a"], short_wav))
            long_audio = await client.post("/lipsync/generate", **_files(clip1s, short_wav))
            return big, long_video, long_audio

    big, long_video, long_audio = run(scenario())
    assert big.status_code == 413 and "audio is larger than 65536 bytes" in big.json()["error"]
    assert long_video.status_code == 422 and "at most 1.5 s" in long_video.json()["error"]
    assert long_audio.status_code == 422 and "at most 2 s" in long_audio.json()["error"]
    # Leftover temp folders would fill the disk under load: every request cleaned up after itself.
    assert not any((tmp_path / "data" / "tmp").iterdir())


def test_hand_parsed_form_fields_are_checked_like_json_ones(lipsync_settings):
    """The multipart form is parsed by hand: its URL and text fields get the contracts' checks, never a 500."""
    video = ("v.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, "video/mp4")
    cases = [
        ({"audio_url": "http://[::1"}, "audio_url is not a valid URL"),
        ({"audio_url": "http://host:port/artifacts/x.wav"}, "audio_url is not a valid URL"),
        ({"audio_url": "/artifacts/" + "0" * 32 + ".wav\x00"}, "audio_url contains the control character U+0000"),
        ({"audio_url": "/artifacts/x.wav", "length_policy": "trim\x00"},
         "length_policy contains the control character U+0000"),
    ]

    async def scenario():
        async with running_app(lipsync_settings) as client:
            answers = [await client.post("/lipsync/generate", files={"video": video}, data=fields)
                       for fields, _ in cases]
            # A surrogate cannot be sent as UTF-8: its bytes (ED A0 80) are refused as what they are.
            boundary = "xb0undary"
            raw = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio_url\"\r\n\r\n".encode()
                   + b"/artifacts/\xed\xa0\x80.wav" + f"\r\n--{boundary}--\r\n".encode())
            answers.append(await client.post("/lipsync/generate", content=raw,
                                             headers={"content-type": f"multipart/form-data; boundary={boundary}"}))
            return answers

    answers = run(scenario())
    for (fields, words), resp in zip(cases + [({}, "audio_url is not valid UTF-8")], answers):
        assert resp.status_code == 422, (fields, resp.status_code, resp.text)
        assert words in resp.json()["error"], (words, resp.text)
        assert "Traceback" not in resp.text


def test_tiny_frames_and_two_faces_are_named_not_called_corrupt(lipsync_settings, tmp_path):
    from skimage import data as skdata

    import subprocess

    from gpu_service.talking_head.video import encode_mp4, ffmpeg_exe

    tiny = {}
    for side in (1, 2):
        path = tmp_path / f"v{side}.mp4"
        subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
                        "-i", f"color=c=red:s={side}x{side}:d=1:r=25", "-c:v", "libx264", "-pix_fmt", "yuv444p",
                        str(path)], check=True)
        tiny[side] = path
    astro = skdata.astronaut()
    pair = np.ascontiguousarray(np.concatenate([astro, astro[:, ::-1]], axis=1))  # two full-size faces, 1024x512
    (tmp_path / "pair.mp4").write_bytes(encode_mp4([pair] * 10, 25, (1024, 512))[0])
    tone = tmp_path / "tone.wav"
    t = np.arange(22050) / 22050
    tone.write_bytes(_wav_bytes((0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 22050))

    async def scenario():
        async with running_app(lipsync_settings) as client:
            return [await client.post("/lipsync/generate", **_files(path, tone, length_policy="trim"))
                    for path in (tiny[1], tiny[2], tmp_path / "pair.mp4")]

    one, two, pair_resp = run(scenario())
    for resp, side in ((one, 1), (two, 2)):
        assert resp.status_code == 422, resp.text
        assert f"video is {side}x{side} pixels; lip-sync needs at least 64x64" in resp.json()["error"]
    assert pair_resp.status_code == 422, pair_resp.text
    assert "2 faces found" in pair_resp.json()["error"], pair_resp.text


def test_sample_aspect_ratio_and_colour_description_are_kept(media):
    """A re-voiced clip keeps its source's pixel shape and colour tags, and its colours (same YUV matrix)."""
    from avatar_contracts.probe import probe
    from gpu_service.lipsync.engines.landmark import LandmarkLipSync
    from gpu_service.lipsync.protocol import LipSyncJob
    from gpu_service.lipsync.stream_io import open_video

    src_path = media["transcode"](
        "anamorphic_709.mp4", "-vf", "scale=out_color_matrix=bt709:out_range=tv,setsar=4/3,"
        "setparams=color_primaries=bt709:color_trc=bt709:colorspace=bt709:range=tv", "-c:v", "libx264", "-c:a", "copy")
    before = probe(src_path)
    assert before.sample_aspect_ratio == Fraction(4, 3) and before.color_space == "bt709", before
    eng = LandmarkLipSync()
    eng.load("cpu")
    res = eng.lipsync(LipSyncJob(video=open_video(src_path, max_s=60, max_pixels=10**6), audio=media["audio_b"],
                                 sample_rate=media["sr_b"], length_policy="trim"))
    after = probe(res.mp4)
    assert after.sample_aspect_ratio == Fraction(4, 3)
    assert (after.color_space, after.color_primaries, after.color_trc, after.color_range) == (
        "bt709", "bt709", "bt709", "tv")
    # Colours survive the round trip away from the mouth: the top rows (forehead, background) match.
    src_top = read_frames(src_path.read_bytes(), (320, 320))[5, :60].astype(np.float32)
    out_top = read_frames(res.mp4, (320, 320))[5, :60].astype(np.float32)
    assert np.abs(src_top.mean(axis=(0, 1)) - out_top.mean(axis=(0, 1))).max() < 3.0
