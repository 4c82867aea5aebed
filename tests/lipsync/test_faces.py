"""Lip-sync of a video with two faces: the largest by default, face_index picks the other, and a 422 past the last."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from gpu_service.talking_head import landmarks as L
from gpu_service.talking_head.video import encode_mp4, read_frames
from tests.conftest import running_app
from tests.lipsync.media import speak

P11 = Path(__file__).resolve().parents[1] / "fixtures" / "media" / "p11_two_faces_obama_biden.jpg"


@pytest.fixture
def lipsync_settings(tmp_path: Path):
    from gpu_service.settings import Settings

    return Settings(device="cpu", tts_engines=["piper"], video_engines=[], lipsync_engines=["landmark"],
                    data_dir=tmp_path / "data", preset_avatars_dir=tmp_path / "presets")


@pytest.fixture(scope="module")
def two_faces(tmp_path_factory, piper_engine) -> dict:
    """A 1.2 s still video of p11 (two faces side by side) and a short sentence with its phonemes."""
    image = cv2.cvtColor(cv2.imread(str(P11)), cv2.COLOR_BGR2RGB)
    image = np.ascontiguousarray(image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2])
    h, w = image.shape[:2]
    data, _ = encode_mp4([image] * 30, 25, (w, h))
    path = tmp_path_factory.mktemp("faces") / "p11.mp4"
    path.write_bytes(data)
    audio, sr, phones = speak(piper_engine, "Mama made my bed.")
    import soundfile as sf

    wav = path.with_suffix(".wav")
    sf.write(wav, audio, sr, subtype="PCM_16")
    source = read_frames(data, (w, h))
    faces = L.detect_faces(source[0])
    assert len(faces) == 2
    return {"video": path, "wav": wav, "phones": phones, "size": (w, h), "source": source,
            "boxes": [L.face_box(f) for f in faces]}


def box_mask(shape, box, pad=0.0):
    x, y, w, h = box
    m = np.zeros(shape, bool)
    m[max(0, int(y - pad * h)):int(y + h + pad * h), max(0, int(x - pad * w)):int(x + w + pad * w)] = True
    return m


def test_face_index_picks_the_face_that_is_revoiced(lipsync_settings, two_faces):
    phones = json.dumps([{"phoneme": p, "start_s": s, "end_s": e} for p, s, e in two_faces["phones"]])

    async def post(client, **fields):
        files = {"video": ("p11.mp4", two_faces["video"].read_bytes(), "video/mp4"),
                 "audio": ("s.wav", two_faces["wav"].read_bytes(), "audio/wav")}
        return await client.post("/lipsync/generate", files=files,
                                 data={"phonemes": phones, "length_policy": "trim", **fields})

    async def scenario():
        async with running_app(lipsync_settings) as client:
            return (await post(client), await post(client, face_index="1"), await post(client, face_index="2"),
                    await post(client, face_index="one"), await post(client, face_index="\u00b2"))

    default, second, beyond, word, superscript = asyncio.run(scenario())
    source, (w, h) = two_faces["source"], two_faces["size"]
    largest, other = two_faces["boxes"]
    for resp, chosen, untouched in ((default, largest, other), (second, other, largest)):
        assert resp.status_code == 200, resp.text
        assert int(resp.headers["X-Frames-Without-Face"]) == 0
        frames = read_frames(resp.content, (w, h))
        n = min(len(frames), len(source))
        moved = (np.abs(frames[:n].astype(int) - source[:n]).max(-1) > 30).any(0)
        assert moved.sum() > 40
        # What moved is the chosen face's mouth; the other face stays as filmed.
        assert box_mask((h, w), chosen, pad=0.3)[moved].all()
        assert not moved[box_mask((h, w), untouched)].any()
    for resp, words in ((beyond, "face_index=2 but 2 faces were found in the video's first frame"),
                        (word, "face_index must be a whole number"),
                        (superscript, "face_index must be a whole number")):  # a digit to isdigit(), not to int()
        assert resp.status_code == 422, resp.text
        assert words in resp.json()["error"], resp.text
