"""Self-reenactment: a real clip of a person speaking is the ground truth for our mouths.

`python -m evaluator reenact CLIP.mp4 [...] --gpu-url URL --out DIR` takes each clip's own audio
(decoded with PyAV) and drives the GPU service twice:

- ``head``: a talking head from the clip's first closed-mouth frame (POST /avatars, then
  POST /video/generate with the audio as base64 and no phoneme timings, as a user would);
- ``lipsync``: the clip itself re-voiced with its own audio (POST /lipsync/generate).

Both outputs should then move their mouths as the real person did. Each output is put on the
real clip's frame times and measured against it frame by frame (evaluator.metrics.mouth_match)
with one landmark judge (evaluator.metrics.judges): MediaPipe by default, which is the renderer's
own landmark model, as the JSON says; ``--judge dlib`` for one the renderer does not use.
A clip compared with itself scores amp 1, r 1, lmd 0; a still mouth scores amp ~0 and r ~0 and
its lmd is ``lmd_still``; the open mouth's interior is compared down its midline
(``interior_over_flat``: below 1 it has the real interior's layout of teeth and throat). Per clip:
``<clip>/reenact.json``, ``<clip>/contact_sheet.png`` and the outputs; for the run:
``reenact_summary.json`` and ``reenact_summary.md``. ``--gate`` applies the ``reenact`` section of
evaluator/config/quality_gate.yaml and exits 1 on a miss.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import cv2
import httpx
import numpy as np

from evaluator import gate as gate_mod
from evaluator.client import GpuClient, ServiceError, check
from evaluator.metrics import mouth_match as mm
from evaluator.metrics.judges import MEDIAPIPE, Judge, get_judge
from evaluator.metrics.phonemes import CLOSED_GAP
from evaluator.report import fmt
from evaluator.runner import png_bytes

log = logging.getLogger(__name__)

SCHEMA = "avatar-eval-reenact/1"
MODES = ("head", "lipsync")
AUDIO_RATE = 16000
SHEET_FRAMES = 8
SHEET_SCALE = 2


@dataclass
class Video:
    """Decoded frames with their times, and the mono audio track (None when there is none)."""

    frames: np.ndarray
    """(T, H, W, 3) RGB uint8."""
    times: np.ndarray
    """Seconds from the first frame."""
    fps: float
    audio: Optional[np.ndarray]
    sample_rate: int


def decode(path: Path, audio_rate: int = AUDIO_RATE) -> Video:
    """Decode an MP4 (or anything FFmpeg reads) with PyAV: RGB frames, their times, fps, mono float32 audio."""
    import av

    try:
        with av.open(str(path)) as box:
            if not box.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = box.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            frames, times = [], []
            for i, frame in enumerate(box.decode(stream)):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(frame.time if frame.time is not None else i / fps)
        audio = _decode_audio(path, audio_rate)
    except av.FFmpegError as exc:
        raise ValueError(f"cannot decode {path}: {exc}") from None
    if not frames:
        raise ValueError(f"{path} has no frames")
    t = np.asarray(times, np.float64)
    return Video(np.stack(frames), t - t[0], fps, audio, audio_rate)


def _decode_audio(path: Path, rate: int) -> Optional[np.ndarray]:
    import av

    with av.open(str(path)) as box:
        if not box.streams.audio:
            return None
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        chunks = []
        for frame in box.decode(box.streams.audio[0]):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32) / 32768.0 if chunks else None


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    """16-bit PCM WAV of mono float audio."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def closed_frame(gap: np.ndarray, threshold: float = CLOSED_GAP) -> tuple[int, bool]:
    """(first frame whose inner-lip gap is below threshold, True) or (the most closed frame, False)."""
    below = np.flatnonzero(np.isfinite(gap) & (gap < threshold))
    if below.size:
        return int(below[0]), True
    return int(np.nanargmin(gap)), False


@dataclass
class Reference:
    """The real clip, measured once by a judge: its landmarks and inner-lip gap per frame."""

    video: Video
    landmarks: np.ndarray
    gap: np.ndarray
    judge: Judge
    open_range: tuple[float, float] = (float("nan"), float("nan"))
    """The gaps (face heights) of the frames whose interiors are compared (mouth_match.PROFILE_OPEN of the p95)."""
    profiles: Optional[np.ndarray] = None
    """(T, S) the real mouth's interior profile per frame (mouth_match.interior_profiles), NaN where not open;
    None: not measured, and no interior figures."""


def measure_reference(video: Video, judge: Judge) -> Reference:
    """Track the real clip with the judge."""
    lm = judge.track(video.frames)
    if not np.isfinite(lm).all(axis=(1, 2)).any():
        raise ValueError("no face found in the real clip")
    gap = judge.mouth_gap(lm)
    p95 = float(np.nanpercentile(gap, 95))
    lo, hi = (share * p95 for share in mm.PROFILE_OPEN)
    return Reference(video, lm, gap, judge, (lo, hi), mm.interior_profiles(video.frames, lm, judge, lo, hi))


def compare(ref: Reference, out: Video) -> tuple[dict, dict, list]:
    """An output against the real clip: (figures, series for plots, aligned RGB mouth crops per real frame)."""
    judge, real = ref.judge, ref.video
    native = judge.track(out.frames)
    native_gap = judge.mouth_gap(native)
    lm = mm.resample_landmarks(native, out.times, real.times)
    gap = judge.mouth_gap(lm)
    pick = mm.nearest_frames(out.times, real.times)
    width = mm.mouth_width(ref.landmarks, judge)
    ssim, ssim_still = np.full(len(real.frames), np.nan), np.full(len(real.frames), np.nan)
    crops: list = []
    for t, real_lm in enumerate(ref.landmarks):
        crop = None
        if np.isfinite(real_lm).all():
            box = mm.mouth_box(real_lm, judge, real.frames.shape[1:3], width)
            x0, y0, x1, y1 = box
            real_crop = real.frames[t, y0:y1, x0:x1]
            if np.isfinite(lm[t]).all():
                crop = mm.aligned_mouth(out.frames[pick[t]], native[pick[t]], real_lm, judge, box)
            if crop is not None:
                ssim[t] = mm.crop_ssim(crop, real_crop)
            still = mm.aligned_mouth(real.frames[0], ref.landmarks[0], real_lm, judge, box)
            if still is not None:
                ssim_still[t] = mm.crop_ssim(still, real_crop)
        crops.append(crop)
    lmd = mm.lip_distance(lm, ref.landmarks, judge)
    lmd_still = mm.still_lip_distance(ref.landmarks, judge)
    figs = mm.figures(native_gap, out.fps, gap, ref.gap, real.fps, lmd, lmd_still, ssim, ssim_still)
    profile = None
    if ref.profiles is not None:
        rows = mm.interior_profiles(out.frames, native, judge, *ref.open_range)[pick]  # on the real frames
        figs.update(mm.interior_figures(rows, ref.profiles))
        profile = mm.mean_profile(rows[np.isfinite(rows).all(1) & np.isfinite(ref.profiles).all(1)])
    figs.update(frames=int(len(out.frames)), fps=out.fps,
                resampled=bool(abs(out.fps - real.fps) > 1e-6 or len(out.frames) != len(real.frames)),
                face_found_share=float(np.isfinite(native).all(axis=(1, 2)).mean()),
                upper_share=mm.upper_share(native, judge))
    series = {"gap": _jsonable(gap), "lmd": _jsonable(lmd), "lmd_still": _jsonable(lmd_still),
              "mouth_ssim": _jsonable(ssim), "interior_profile": _profile_json(profile)}
    return figs, series, crops


def rendered_only(ref: Reference, series: dict, spans: list, figs: dict) -> dict:
    """lmd over the frames the service rendered, leaving out those it kept as filmed (`filmed_spans`).

    In self-reenactment a frame kept as filmed is the real mouth itself, so lmd_over_still counts it
    as a perfect match; lmd_rendered_over_still is the same ratio over the other frames alone (None
    when the output was resampled onto the real frames, or too few frames were rendered).
    """
    kept = np.zeros(len(ref.landmarks), bool)
    for a, b in spans or []:
        kept[max(int(a), 0):min(int(b), len(kept))] = True
    out = {"frames_as_filmed": int(kept.sum()), "lmd_rendered": None, "lmd_rendered_over_still": None}
    ours, still = (np.array([np.nan if v is None else v for v in series[k]], np.float64) for k in ("lmd", "lmd_still"))
    use = ~kept & np.isfinite(ours) & np.isfinite(still)
    if figs.get("resampled") or use.sum() < 3 or len(ours) != len(kept):
        return out
    out["lmd_rendered"] = float(ours[use].mean())
    out["lmd_rendered_over_still"] = float(ours[use].mean() / max(still[use].mean(), 1e-9))
    return out


def _profile_json(profile: Optional[np.ndarray]) -> Optional[list]:
    return None if profile is None else _jsonable(profile)


def _jsonable(x: np.ndarray) -> list:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(x, np.float64)]


def real_crops(ref: Reference) -> list:
    """The real clip's own mouth crops (the contact sheet's top row)."""
    width = mm.mouth_width(ref.landmarks, ref.judge)
    out = []
    for t, lm in enumerate(ref.landmarks):
        if not np.isfinite(lm).all():
            out.append(None)
            continue
        x0, y0, x1, y1 = mm.mouth_box(lm, ref.judge, ref.video.frames.shape[1:3], width)
        out.append(ref.video.frames[t, y0:y1, x0:x1])
    return out


# -- driving the service -------------------------------------------------------------------------
def render_head(client: GpuClient, portrait: np.ndarray, wav: bytes) -> tuple[bytes, dict]:
    """Talking head from the portrait frame and the clip's audio (no phoneme timings): (MP4, answer)."""
    avatar = client.upload_avatar(png_bytes(portrait))
    body = {"avatar_id": avatar["avatar_id"], "audio": base64.b64encode(wav).decode("ascii")}
    answer = client.video(body)
    return client.download(answer["video_url"]), {**answer, "avatar": avatar}


def render_lipsync(client: GpuClient, clip_mp4: bytes, wav: bytes) -> tuple[bytes, dict]:
    """The clip re-voiced with its own audio by POST /lipsync/generate (multipart): (MP4, answer)."""
    files = {"video": ("clip.mp4", clip_mp4, "video/mp4"), "audio": ("audio.wav", wav, "audio/wav")}
    resp = client.http.post("/lipsync/generate", data={"response": "json"}, files=files)
    answer = check(resp, "POST /lipsync/generate").json()
    return client.download(answer["video_url"]), answer


def measure_clip(path: Path, client: GpuClient, out_dir: Path, judge: Judge,
                 modes: Sequence[str] = MODES, closed_gap: float = CLOSED_GAP) -> dict:
    """Drive every mode with one real clip, measure the outputs, write its JSON and contact sheet."""
    path = Path(path)
    real = decode(path)
    if real.audio is None or len(real.audio) == 0:
        raise ValueError(f"{path} has no audio track: the clip's own speech drives the outputs")
    ref = measure_reference(real, judge)
    # The portrait is chosen with MediaPipe whatever the judge: it is the renderer's own landmark
    # model, so its "closed" is the closed mouth the renderer starts from, and every judge then
    # measures the same outputs.
    mp_gap = ref.gap if judge is MEDIAPIPE else MEDIAPIPE.mouth_gap(MEDIAPIPE.track(real.frames))
    k, closed = closed_frame(mp_gap, closed_gap)
    clip_dir = out_dir / path.stem
    clip_dir.mkdir(parents=True, exist_ok=True)
    rec: dict = {
        "clip": path.stem, "path": str(path), "frames": int(len(real.frames)), "fps": real.fps,
        "duration_s": float(len(real.frames) / real.fps), "judge": judge.describe(),
        "real": {"p95_gap": float(np.nanpercentile(ref.gap, 95)), "max_jump": mm.max_jump(ref.gap, real.fps),
                 "face_found_share": float(np.isfinite(ref.gap).mean()),
                 "upper_share": mm.upper_share(ref.landmarks, judge), "portrait_frame": k,
                 "portrait_gap_mediapipe": float(mp_gap[k]), "portrait_closed": closed, "closed_gap_threshold": closed_gap,
                 "interior_open_range": [float(x) for x in ref.open_range]},
        "modes": {},
    }
    if not closed:
        log.warning("no closed-mouth frame", extra={"clip": path.stem, "gap": float(mp_gap[k])})
    if judge is not MEDIAPIPE:
        # How far the judge agrees with the renderer's own landmark model on the real mouth.
        ok = np.isfinite(mp_gap) & np.isfinite(ref.gap)
        rec["real"]["gap_r_vs_mediapipe"] = float(np.corrcoef(mp_gap[ok], ref.gap[ok])[0, 1]) if ok.sum() > 2 else None
    wav = wav_bytes(real.audio, real.sample_rate)
    series = {"real_gap": _jsonable(ref.gap), "interior_t": list(mm.PROFILE_T),
              "real_interior_profile": None if ref.profiles is None else _profile_json(mm.mean_profile(ref.profiles))}
    crops = {"real": real_crops(ref)}
    cv2.imwrite(str(clip_dir / "portrait.png"), cv2.cvtColor(real.frames[k], cv2.COLOR_RGB2BGR))
    for mode in modes:
        try:
            if mode == "head":
                mp4, answer = render_head(client, real.frames[k], wav)
            else:
                mp4, answer = render_lipsync(client, path.read_bytes(), wav)
        except ServiceError as exc:
            rec["modes"][mode] = {"status": "failed", "reason": str(exc)}
            continue
        out_path = clip_dir / f"{mode}.mp4"
        out_path.write_bytes(mp4)
        figs, s, c = compare(ref, decode(out_path))
        if mode == "lipsync":
            figs.update(rendered_only(ref, s, answer.get("filmed_spans"), figs))
        rec["modes"][mode] = {"status": "ok", **figs, "video": out_path.name,
                              "service": {key: answer.get(key) for key in ("frames", "fps", "duration_s", "timings_ms",
                                                                           "engine", "length_policy", "device",
                                                                           "timing_source", "frames_as_filmed")}}
        series[f"{mode}_gap"] = s["gap"]
        series[f"{mode}_lmd"] = s["lmd"]
        series[f"{mode}_interior_profile"] = s["interior_profile"]
        crops[mode] = c
    rec["contact_sheet"] = contact_sheet(rec, ref, series, crops, clip_dir / "contact_sheet.png").name
    (clip_dir / "reenact.json").write_text(_dumps({**rec, "series": series}))
    return rec


# -- contact sheet -------------------------------------------------------------------------------
def sheet_window(real_gap: np.ndarray, n: int = SHEET_FRAMES) -> int:
    """First frame of the n consecutive frames where the real mouth moves most."""
    g = np.nan_to_num(np.asarray(real_gap, np.float64))
    if len(g) <= n:
        return 0
    motion = np.abs(np.diff(g))
    sums = np.convolve(motion, np.ones(n - 1), mode="valid")
    return int(np.argmax(sums))


def contact_sheet(rec: dict, ref: Reference, series: dict, crops: dict, path: Path) -> Path:
    """PNG: rows of mouth close-ups at SHEET_SCALE (real, then each output at the same frames), then gap over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = sheet_window(ref.gap)
    idx = list(range(start, min(start + SHEET_FRAMES, len(ref.gap))))
    sample = next(c for c in crops["real"] if c is not None)
    ch, cw = sample.shape[0] * SHEET_SCALE, sample.shape[1] * SHEET_SCALE
    label_w, head_h = 110, 22
    rows = [("real", crops["real"])] + [(m, crops[m]) for m in MODES if m in crops]
    sheet = np.full((head_h + ch * len(rows), label_w + cw * len(idx), 3), 255, np.uint8)
    for j, t in enumerate(idx):
        cv2.putText(sheet, f"frame {t}", (label_w + j * cw + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    for i, (name, row) in enumerate(rows):
        y = head_h + i * ch
        cv2.putText(sheet, "lip-sync" if name == "lipsync" else name, (6, y + ch // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (0, 0, 0), 1, cv2.LINE_AA)
        for j, t in enumerate(idx):
            crop = row[t] if t < len(row) else None
            if crop is not None and crop.shape[:2] == sample.shape[:2]:
                big = cv2.resize(crop, (cw, ch), interpolation=cv2.INTER_NEAREST)
                sheet[y:y + ch, label_w + j * cw:label_w + (j + 1) * cw] = big
    width_in = sheet.shape[1] / 100.0
    fig, (ax, ax_in) = plt.subplots(1, 2, figsize=(width_in, 2.6), dpi=100, gridspec_kw={"width_ratios": (3, 1)})
    t = np.arange(len(ref.gap)) / ref.video.fps
    ax.plot(t, ref.gap, color="black", lw=2, label=f"real (max jump {rec['real']['max_jump']:.3f})")
    for mode, color in (("head", "tab:red"), ("lipsync", "tab:blue")):
        if f"{mode}_gap" in series:
            m = rec["modes"][mode]
            g = np.array([np.nan if v is None else v for v in series[f"{mode}_gap"]])
            ax.plot(t, g, color=color, lw=1.3,
                    label=f"{mode}: amp {fmt(m.get('amp'), '{:.2f}')}, r {fmt(m.get('r'), '{:.2f}')} "
                          f"(lag {m.get('lag_frames')}), jump {fmt(m.get('jump'), '{:.3f}')}")
    ax.axvspan(idx[0] / ref.video.fps, (idx[-1] + 1) / ref.video.fps, color="0.85", zorder=0)
    ax.set_xlabel("s")
    ax.set_ylabel("inner-lip gap / face height")
    ax.set_title(f"{rec['clip']} (judge: {rec['judge']['name']}); shaded: the frames above", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    _interior_panel(ax_in, rec, series)
    fig.tight_layout()
    fig.canvas.draw()
    plot = np.asarray(fig.canvas.buffer_rgba())[:, :, :3]
    plt.close(fig)
    if plot.shape[1] != sheet.shape[1]:
        plot = cv2.resize(plot, (sheet.shape[1], int(round(plot.shape[0] * sheet.shape[1] / plot.shape[1]))),
                          interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(path), cv2.cvtColor(np.vstack([sheet, plot]), cv2.COLOR_RGB2BGR))
    return path


def _interior_panel(ax, rec: dict, series: dict) -> None:
    """The mean interior profiles (mouth_match.interior_profiles): real in black, each output in its colour."""
    ts = series.get("interior_t") or []
    for name, key, color in (("real", "real_interior_profile", "black"), ("head", "head_interior_profile", "tab:red"),
                             ("lipsync", "lipsync_interior_profile", "tab:blue")):
        prof = series.get(key)
        if prof is None:
            continue
        label = name if name == "real" else f"{name}: {fmt(rec['modes'][name].get('interior_over_flat'), '{:.2f}')} of flat"
        ax.plot(ts, [np.nan if v is None else v for v in prof], color=color, lw=2 if name == "real" else 1.3, label=label)
    ax.axvspan(0.0, 1.0, color="0.92", zorder=0)
    ax.set_xlabel("down the midline (0 upper inner lip, 1 lower)", fontsize=7)
    ax.set_ylabel("luminance", fontsize=7)
    ax.set_title("open mouth's interior", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="lower right")


# -- summary and gate ----------------------------------------------------------------------------
def load_gate(path: Optional[Path] = None) -> dict:
    """The `reenact` section of the gate config: {mode: {figure: {rule: limit}}}; ValueError when malformed."""
    data = gate_mod.load_config(path)
    section = data.get("reenact")
    where = f"gate config {path or gate_mod.DEFAULT_CONFIG}"
    if not isinstance(section, dict) or not section:
        raise ValueError(f"{where} has no 'reenact' section")
    for mode, rules in section.items():
        if mode not in MODES or not isinstance(rules, dict):
            raise ValueError(f"{where}: reenact.{mode} must be one of {', '.join(MODES)} mapping figures to rules")
        for figure, rule in rules.items():
            if not isinstance(rule, dict) or not rule or set(rule) - set(gate_mod.RULES) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in rule.values()):
                raise ValueError(f"{where}: reenact.{mode}.{figure} must map {', '.join(gate_mod.RULES)} to numbers")
    return section


def apply_gate(records: list[dict], section: dict) -> dict:
    """The gate over every clip and mode, in the shape of evaluator.gate.evaluate's answer."""
    result = {"passed": True, "checked": 0, "misses": [], "unmeasured": [], "thresholds": section}
    for mode, thresholds in section.items():
        scenarios = [{"name": f"{r['clip']}/{mode}", "status": r["modes"][mode]["status"],
                      "reason": r["modes"][mode].get("reason"), "quality": r["modes"][mode]}
                     for r in records if mode in r["modes"]]
        part = gate_mod.evaluate({"scenarios": scenarios}, {"thresholds": thresholds, "fail_on_failed_scenarios": True})
        result["passed"] &= part["passed"]
        result["checked"] += part["checked"]
        result["misses"] += part["misses"]
        result["unmeasured"] += part["unmeasured"]
    return result


def markdown(summary: dict, with_gate: bool = True) -> str:
    """The headline table (as in the realism issue), every figure per clip and mode, and the gate's misses."""
    judge = summary["judge"]
    lines = [f"Self-reenactment, judge {judge['name']} ({'independent of' if judge['independent_of_renderer'] else 'the same model as'}"
             f" the renderer's landmarks), {summary['created_at']}", "",
             "| clip | head amp | head jump | head r | lip-sync amp | lip-sync lmd / still mouth | real clip's own max jump |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["clips"]:
        h, ls = r["modes"].get("head", {}), r["modes"].get("lipsync", {})
        lines.append(f"| {r['clip'][:3]} | {fmt(h.get('amp'), '{:.2f}')} | {fmt(h.get('jump'), '{:.3f}')} | "
                     f"{fmt(h.get('r'), '{:.2f}')} | {fmt(ls.get('amp'), '{:.2f}')} | "
                     f"{fmt(ls.get('lmd'), '{:.3f}')} / {fmt(ls.get('lmd_still'), '{:.3f}')} | "
                     f"{fmt(r['real']['max_jump'], '{:.3f}')} |")
    cols = (("amp", "{:.2f}"), ("jump", "{:.3f}"), ("r", "{:.2f}"), ("lag_frames", "{:+d}"), ("r_lag0", "{:.2f}"),
            ("lmd", "{:.3f}"), ("lmd_still", "{:.3f}"), ("lmd_over_still", "{:.2f}"), ("frames_as_filmed", "{:d}"),
            ("lmd_rendered_over_still", "{:.2f}"), ("mouth_ssim", "{:.3f}"), ("mouth_ssim_still", "{:.3f}"),
            ("upper_share", "{:.2f}"), ("interior_mae", "{:.1f}"), ("interior_flat_mae", "{:.1f}"),
            ("interior_over_flat", "{:.2f}"))
    lines += ["", "| clip | mode | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for r in summary["clips"]:
        for mode, m in r["modes"].items():
            if m["status"] != "ok":
                lines.append(f"| {r['clip'][:3]} | {mode} | failed: {m.get('reason')} |")
                continue
            lines.append(f"| {r['clip'][:3]} | {mode} | " + " | ".join(fmt(m.get(c), s) for c, s in cols) + " |")
    if summary.get("cross"):
        lines += ["", "Lip-sync re-voiced with another clip's speech: r against that speech's own talker, and what the",
                  "filmed mouth passed through would score (margin = r - passthrough; above 0: it follows the new speech)", "",
                  "| clip | voice | r | r passthrough | margin | r vs filmed | amp |", "|---|---|---|---|---|---|---|"]
        for c in summary["cross"]:
            if c["status"] != "ok":
                lines.append(f"| {c['clip'][:3]} | {c['voice'][:3]} | failed: {c.get('reason')} |")
                continue
            lines.append(f"| {c['clip'][:3]} | {c['voice'][:3]} | {fmt(c['r'], '{:.2f}')} | {fmt(c['r_passthrough'], '{:.2f}')} | "
                         f"{fmt(c['margin'], '{:+.2f}')} | {fmt(c['r_filmed'], '{:.2f}')} | {fmt(c['amp'], '{:.2f}')} |")
    gate = summary.get("gate")
    if gate and with_gate:
        lines += ["", f"Reenact gate: {'passed' if gate['passed'] else 'failed'} ({gate['checked']} checks)"]
        lines += [f"- {m['text']}" for m in gate["misses"]]
    return "\n".join(lines) + "\n"


def _dumps(data) -> str:
    import json

    return json.dumps(data, indent=1, default=str, allow_nan=False)


def cross_figures(out_gap: np.ndarray, filmed_gap: np.ndarray, voice_gap: np.ndarray, fps: float) -> dict:
    """A clip re-voiced with another clip's speech, against both real mouths (gaps on the output's frames).

    ``r``: the output against the real mouth of the speech's own talker (what a re-voiced mouth should follow);
    ``r_passthrough``: the filmed mouth itself against that talker, what an engine that left the source
    mouth as filmed would score (GRID's sentences share one grammar, so two talkers' mouths correlate
    somewhat); ``margin`` = r - r_passthrough (above 0: the mouth follows the new speech, not the filmed
    one); ``r_filmed``: the output against its own filmed mouth; ``amp``: p95 gap over the talker's p95.
    """
    n = min(len(out_gap), len(filmed_gap), len(voice_gap))
    o, f, v = (np.asarray(x[:n], np.float64) for x in (out_gap, filmed_gap, voice_gap))
    r, lag, _ = mm.lagged_correlation(o, v, fps)
    r_pass, _, _ = mm.lagged_correlation(f, v, fps)
    r_filmed, _, _ = mm.lagged_correlation(o, f, fps)
    return {"r": r, "lag_frames": int(lag), "r_passthrough": r_pass, "margin": r - r_pass, "r_filmed": r_filmed,
            "amp": mm.amplitude(o, v), "frames": int(n)}


def measure_cross(clips: Sequence[Path], client: GpuClient, out_dir: Path, judge: Judge) -> list[dict]:
    """Each clip re-voiced with the next clip's audio (the last with the first's), measured by cross_figures."""
    decoded = [decode(Path(c)) for c in clips]
    gaps = [judge.mouth_gap(judge.track(v.frames)) for v in decoded]
    records = []
    for i, clip in enumerate(clips):
        j = (i + 1) % len(clips)
        rec = {"clip": Path(clip).stem, "voice": Path(clips[j]).stem}
        try:
            mp4, _ = render_lipsync(client, Path(clip).read_bytes(), wav_bytes(decoded[j].audio, decoded[j].sample_rate))
        except ServiceError as exc:
            records.append({**rec, "status": "failed", "reason": str(exc)})
            continue
        path = out_dir / Path(clip).stem / f"lipsync_voiced_by_{Path(clips[j]).stem[:3]}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(mp4)
        out = decode(path)
        gap = judge.mouth_gap(mm.resample_landmarks(judge.track(out.frames), out.times, decoded[i].times))
        records.append({**rec, "status": "ok", "video": str(path.relative_to(out_dir)),
                        **cross_figures(gap, gaps[i], gaps[j], decoded[i].fps)})
    return records


def run(clips: Sequence[Path], gpu_url: str, out_dir: Path, judge_name: Optional[str] = None,
        modes: Sequence[str] = MODES, gate_config: Optional[Path] = None, cross: bool = False) -> dict:
    """Measure every clip, write reenact_summary.json/.md into out_dir, return the summary (gate included).

    `cross` (two clips or more) also re-voices each clip with the next one's audio (measure_cross): a lip-sync
    that passed its source through would score perfectly on its own audio, and is caught there."""
    judge = get_judge(judge_name)
    section = load_gate(gate_config)
    if not modes or set(modes) - set(MODES):
        raise ValueError(f"modes must be among {', '.join(MODES)}, got {', '.join(modes) or 'none'}")
    for clip in clips:
        if not Path(clip).is_file():
            raise ValueError(f"no such clip: {clip}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = GpuClient(gpu_url)
    try:
        try:
            health = client.health()
        except (httpx.HTTPError, ServiceError) as exc:
            raise ValueError(f"cannot reach the GPU service at {gpu_url}: {exc}") from None
        records = [measure_clip(Path(c), client, out_dir, judge, modes) for c in clips]
        crossed = measure_cross(clips, client, out_dir, judge) if cross and len(clips) > 1 else None
    finally:
        client.close()
    summary = {"schema": SCHEMA, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "gpu_url": gpu_url, "device": health.get("device"), "judge": judge.describe(), "modes": list(modes),
               "clips": records}
    if crossed is not None:
        summary["cross"] = crossed
    summary["gate"] = apply_gate(records, {m: section[m] for m in modes if m in section})
    (out_dir / "reenact_summary.json").write_text(_dumps(summary))
    (out_dir / "reenact_summary.md").write_text(markdown(summary))
    return summary
