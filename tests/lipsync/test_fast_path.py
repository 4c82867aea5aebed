"""Tier 1: the lip-sync's fast path (threaded stages, cropped mouth-only encodings, reused appearance, the
superfast encoder) against the plain per-frame computation it replaced, on a real speaker (kit clip v01)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "media"
CLIP = FIXTURES / "v01_grid_swiz3n_darker_skin_moustache.mp4"
SPEECH = FIXTURES / "a03_cmu_goforward_male.wav"


@pytest.fixture(scope="module")
def kit_job():
    """The engine, the source clip's frames, the new speech and its controls (trim: the speech's 2.8 s)."""
    from gpu_service.lipsync.engines.landmark import LandmarkLipSync, speech_controls
    from gpu_service.lipsync.stream_io import decode_audio_file, open_video

    src = open_video(CLIP, max_s=60, max_pixels=10**6)
    audio, rate = decode_audio_file(SPEECH)
    n = min(src.estimated_frames(), int(round(len(audio) / rate * float(src.fps))))  # as the engine plans it
    engine = LandmarkLipSync()
    engine.load("cpu")
    return {"engine": engine, "src": src, "audio": audio, "rate": rate, "n": n,
            "controls": speech_controls(audio, rate, float(src.fps), n),
            "source": np.stack([f.copy() for f in src.forward()][:n])}


def _reference_frames(src, controls) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The per-frame computation of the engine before its fast path: every frame tracked, encoded whole (the
    full encoding's fields, the interior measured on that frame) and rendered, one stage after the other.
    Returns (frames, the tracked landmarks)."""
    from gpu_service.lipsync.engines.landmark import CLOSE_SEAM, MouthWidthReference, TeethBank, _width_correction, closes
    from gpu_service.lipsync.mouth import inner_gap, refine_inner_lips
    from gpu_service.lipsync.stream_io import frames_in_order
    from gpu_service.lipsync.tracking import FaceTracker
    from gpu_service.talking_head.encoding import encode_from_landmarks, measure_appearance
    from gpu_service.talking_head.renderer import Renderer

    renderer = Renderer("cpu")
    widths = MouthWidthReference(window=int(10 * float(src.fps)))
    teeth = TeethBank()  # the person's own teeth colour is part of the computation, not of its speed-up
    prev, out, marks = None, [], []
    with FaceTracker(float(src.fps)) as tracker:
        for i, (_, frame) in enumerate(frames_in_order(src, controls.n_frames, "trim", 8)):
            lm = refine_inner_lips(frame, tracker.track(frame))
            marks.append(lm)
            ctl = controls.slice(i, i + 1)
            closing = closes(prev, ctl, inner_gap(lm))
            enc = encode_from_landmarks(frame, lm, seam=CLOSE_SEAM if closing else 0.5, follow_gap=closing,
                                        appearance=teeth.dress(measure_appearance(frame, lm)), edge_overlap=0.0)
            prev = enc
            teeth.see(enc)
            c = _width_correction(enc, ctl, widths.update(enc))
            out.append(next(iter(renderer.frames(enc, c, head_motion=False,
                                                 close_upper=CLOSE_SEAM if closing else 0.4))))
    return out, marks


def _mouth_box(lm: np.ndarray, shape: tuple[int, int]) -> tuple[slice, slice]:
    """Where a re-voiced mouth can change pixels: from the nose to below the chin, the jaw's width."""
    from gpu_service.talking_head import landmarks as L

    oval = lm[L.FACE_OVAL]
    fw = float(np.ptp(oval[:, 0]))
    fh = float(lm[L.CHIN, 1] - lm[L.FOREHEAD, 1])
    cx = float(oval[:, 0].mean())
    y0, y1 = float(lm[L.NOSE_TIP, 1]) - 0.05 * fh, float(lm[L.CHIN, 1]) + 0.3 * fh
    h, w = shape
    return (slice(max(0, int(y0)), min(h, int(y1) + 1)),
            slice(max(0, int(cx - 0.6 * fw)), min(w, int(cx + 0.6 * fw) + 1)))


def test_fast_frames_match_the_per_frame_computation(kit_job):
    """Same pixels outside the mouth, and inside it no more than the interior's colours measured on a
    frame up to 0.2 s away (APPEARANCE_EVERY_S) can change."""
    from gpu_service.lipsync.engines.landmark import _new_stats

    job = kit_job
    stats = _new_stats()
    fast = list(job["engine"].revoice_frames(job["src"], job["controls"], "trim", stats))
    ref, marks = _reference_frames(job["src"], job["controls"])
    assert len(fast) == len(ref) == job["n"] and stats["frames_without_face"] == 0
    moved = 0
    for i, (a, b, lm) in enumerate(zip(fast, ref, marks)):
        box = _mouth_box(lm, a.shape[:2])
        diff = np.abs(a.astype(np.int16) - b)
        outside = diff.copy()
        outside[box] = 0
        assert not outside.any(), f"frame {i}: pixels changed outside the mouth's reach"
        # Inside: the fields and the warp are the same (a float32 rounding may move a pixel by a level);
        # only the drawn interior may differ, by what the grain and colours of a frame up to 0.2 s away change.
        inside = diff[box]
        assert float(inside.mean()) < 0.1 and np.count_nonzero(inside > 1) <= 0.01 * inside.size, \
            (i, float(inside.mean()), np.count_nonzero(inside > 1), inside.size)
        moved += int(np.abs(b[box].astype(np.int16) - job["source"][i][box]).max() > 20)
    assert moved > 0.5 * len(ref)  # the mouth was re-rendered, not left as filmed (the test can fail)


def test_encoded_video_keeps_the_source_outside_the_mouth_and_moves_it_with_the_speech(kit_job):
    """Through the real MP4 (x264 superfast + macroblock tree, CRF 16): outside the mouth the output is the
    source within a plain re-encode's error; inside, the mouth opens with the new speech."""
    from evaluator.metrics.face import measure_frames
    from gpu_service.lipsync.protocol import LipSyncJob
    from gpu_service.lipsync.tracking import FaceTracker
    from gpu_service.talking_head.video import encode_mp4, read_frames

    job = kit_job
    engine, src = job["engine"], job["src"]
    res = engine.lipsync(LipSyncJob(video=src, audio=job["audio"], sample_rate=job["rate"], length_policy="trim"))
    out = read_frames(res.mp4, src.size)
    source = job["source"]
    plain = read_frames(encode_mp4(list(source), src.fps, src.size, preset=engine.x264_preset, crf=engine.crf,
                                   x264_params=engine.x264_params)[0], src.size)
    assert len(out) == len(plain) == len(source)
    with FaceTracker(float(src.fps)) as tracker:
        boxes = [_mouth_box(tracker.track(f), f.shape[:2]) for f in source]
    err_out, err_plain, inside, inside_plain = [], [], [], []
    for i, box in enumerate(boxes):
        keep = np.ones(source[i].shape[:2], bool)
        keep[box] = False
        err_out.append(float(np.abs(out[i].astype(np.int16) - source[i])[keep].mean()))
        err_plain.append(float(np.abs(plain[i].astype(np.int16) - source[i])[keep].mean()))
        inside.append(float(np.abs(out[i].astype(np.int16) - source[i])[box].mean()))
        inside_plain.append(float(np.abs(plain[i].astype(np.int16) - source[i])[box].mean()))
    # The mouth's changes spread a little through x264's motion search: allow a quarter of a level more.
    assert np.mean(err_out) <= np.mean(err_plain) + 0.25, (np.mean(err_out), np.mean(err_plain))
    assert np.mean(inside) > 1.5 * np.mean(inside_plain), (np.mean(inside), np.mean(inside_plain))
    # The new speech opens the mouth: the output's inner-lip gap follows the controls' opening.
    gap = measure_frames(list(out)).mouth_gap
    opening = job["controls"].mouth_open[: len(gap)]
    ok = np.isfinite(gap)
    r = float(np.corrcoef(gap[ok], opening[ok])[0, 1])
    assert r > 0.5, r
