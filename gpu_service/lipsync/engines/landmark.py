"""Landmark lip-sync engine: re-voices a video by re-rendering each frame's mouth with the talking head.

Per output frame: track the face (smoothed mesh), encode that frame as a talking-head avatar
(`encode_from_landmarks`), and render it with controls driven from the NEW speech, opened as wide as
this person opens when they talk (speaker.py). Because the renderer maps absolute controls onto each
avatar's own rest state, a per-frame encoding makes mouth_open=0 mean "close this frame's mouth,
however open it is": the source's mouth motion is replaced, not added to. The source's mouth width
is neutralised the same way (see `_width_correction`). Head motion is the source's own (no synthetic
head motion); eyes, brows and expression are left as filmed. Frames without a usable face pass
through untouched and are counted.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import replace
from typing import Iterator, Optional

import cv2
import numpy as np

from gpu_service.engine import EngineHealth
from gpu_service.errors import BadMedia
from gpu_service.lipsync import speaker
from gpu_service.lipsync.protocol import LipSyncJob, LipSyncResult
from gpu_service.lipsync.mouth import inner_gap, refine_inner_lips
from gpu_service.lipsync.silence import filmed_weights, source_speech, toward_filmed
from gpu_service.lipsync.stream_io import ReadAhead, VideoSource, frames_in_order, plan_length
from gpu_service.lipsync.tracking import FaceTracker
from gpu_service.talking_head import landmarks as L
from gpu_service.talking_head.controls import Controls
from gpu_service.talking_head.driving import drive, lip_lead, speech_mask
from gpu_service.talking_head.encoding import (MODES, Appearance, Encoding, choose_face, encode_from_landmarks,
                                               lip_colour, measure_appearance)
from gpu_service.talking_head.renderer import Renderer, mode_weights
from gpu_service.talking_head.video import encode_mp4

log = logging.getLogger(__name__)

_SPREAD = MODES.index("spread")
CLOSE_SEAM = 0.15
"""Where the source's open lips meet when closed, as a fraction of its inner-lip gap down from the upper lip.

A mouth opens mostly with the jaw (the talking head lifts the upper lip by 0.15 of an opening), so
closing it must drop the upper lip by about as little. Closing at the midline instead dragged the
upper lip down by 0.4 of the gap: the stretched lip above the seam read as an opening to face
trackers, and the source's old mouth motion leaked into the output. Measured on the astronaut clip
re-voiced with every frame closed (MediaPipe gap of the output against the source's true gap, px
per px): 0.21 at the midline with a 0.4/0.6 split, 0.12 at this seam, 0.08 adding the visible-edge
refinement (mouth.py), 0.01 adding `follow_gap` (each column closed by its own gap).
"""


class TeethBank:
    """This person's own teeth colour, from the frames where the source shows them; drawn teeth take it.

    A frame whose lips are closed shows no teeth, and the drawn ones were an off-white estimated from
    the face's highlights and eye whites (interior_palette). Where the same person's teeth showed in
    another frame, their colour is the better guess: the mean of the last `keep` sightings.
    """

    def __init__(self, keep: int = 25) -> None:
        self._seen: deque[np.ndarray] = deque(maxlen=keep)

    def see(self, enc: Encoding) -> None:
        """Remember this frame's teeth when they are its own (Geometry.own_teeth)."""
        if enc.geometry.own_teeth > 0.0:
            self._seen.append(np.asarray(enc.teeth_rgb, np.float32))

    def dress(self, look: Optional[Appearance]) -> Optional[Appearance]:
        """`look` with the remembered teeth colour, when there is one."""
        if look is None or not self._seen:
            return look
        return look._replace(teeth=np.mean(self._seen, axis=0).astype(np.float32))


APPEARANCE_EVERY_S = 0.2
"""How often the interior's colours and grain are measured on the source (seconds): a person's colouring
and the picture's grain change slowly, and measuring them took a fifth of each frame's face work at 720p.
The lips' colour is measured on every frame (encoding.lip_colour)."""
# Controls the source keeps as filmed: its own blinks, gaze, brows and expression.
_KEEP_SOURCE = ("smile", "brow", "eye_open", "blink", "gaze_x", "gaze_y", "head_yaw", "head_pitch", "head_roll", "head_dx", "head_dy")


def speech_controls(audio: np.ndarray, sample_rate: int, fps: float, n_frames: int,
                    phonemes: Optional[list] = None, timing_source: Optional[str] = None,
                    amplitude: float = 1.0) -> Controls:
    """Mouth controls for n_frames of the new speech; every non-mouth control zero (the source keeps its own).

    `amplitude` is the filmed speaker's own opening over the population's (speaker.amplitude)."""
    ctl = drive(n_frames / float(fps), float(fps), phonemes=phonemes, audio=audio, sample_rate=sample_rate,
                head_motion=False, lip_lead_s=lip_lead(timing_source), amplitude=amplitude)
    if ctl.n_frames != n_frames:  # rounding of duration * fps: pad with rest or cut
        full = Controls.neutral(n_frames, float(fps))
        k = min(n_frames, ctl.n_frames)
        for name in Controls.names():
            getattr(full, name)[:k] = getattr(ctl, name)[:k]
        ctl = full
    for name in _KEEP_SOURCE:
        getattr(ctl, name)[:] = 0.0
    return ctl


class MouthWidthReference:
    """The source's rest mouth width, as a fraction of the face width: the median of recent frames."""

    def __init__(self, window: int = 250) -> None:
        self._ratios: deque[float] = deque(maxlen=window)

    def update(self, enc: Encoding) -> float:
        """Add this frame's mouth-width ratio and return the reference ratio."""
        fw, hw_m = enc.geometry.face_width, enc.geometry.mouth_half_width
        self._ratios.append(hw_m / max(fw, 1.0))
        return float(np.median(self._ratios))


def _width_correction(enc: Encoding, c: Controls, ref_ratio: float) -> Controls:
    """Controls whose spread also undoes the source's own widening or narrowing of the mouth.

    The spread mode moves the corners in pixels; its pixels per unit of mouth_spread are read
    from the renderer's own mapping (it is linear in spread), so this stays right if the
    mapping's constants change.
    """
    fw, hw_m = enc.geometry.face_width, enc.geometry.mouth_half_width
    target = ref_ratio * fw
    base = mode_weights(enc, c)[0, _SPREAD]
    probe = replace(c, mouth_spread=c.mouth_spread + 1.0)
    per_unit = float(mode_weights(enc, probe)[0, _SPREAD] - base)
    if abs(per_unit) < 1e-6:
        return c
    extra = np.clip((target - hw_m) / per_unit, -1.5, 1.5)
    return replace(c, mouth_spread=(c.mouth_spread + extra).astype(np.float32))


def closes(prev: Optional[Encoding], c: Controls, gap: float) -> bool:
    """Whether controls `c` (one frame) ask for less opening than this frame's inner-lip gap (px).

    The previous frame's encoding stands in for this one's face size and widest opening (they
    change slowly); without one, closing is assumed.
    """
    if prev is None:
        return True
    like_this = replace(prev, geometry=replace(prev.geometry, rest_gap=gap))
    return float(mode_weights(like_this, c)[0, 0]) < 0.0


class LandmarkLipSync:
    """Lip-sync by per-frame landmark warping with the talking-head renderer (CPU remap or torch)."""

    name = "landmark"

    def __init__(self, *, preset: str = "superfast", crf: int = 16, x264_params: Optional[str] = "mbtree=1:rc-lookahead=10",
                 chunk_bytes: int = 64 * 1024 * 1024, backend: str = "auto", dtype: str = "auto") -> None:
        # The defaults are LipSyncSettings' (x264_preset, x264_params) and Mp4Settings.crf.
        self.x264_preset = preset
        self.crf = crf
        self.x264_params = x264_params
        self.chunk_bytes = chunk_bytes
        self.backend = backend
        self.dtype = dtype
        self.renderer: Optional[Renderer] = None
        self.device = "cpu"

    def load(self, device: str) -> None:
        """Pick the render path for the device."""
        self.device = device
        self.renderer = Renderer(device, backend=self.backend, dtype=self.dtype)
        log.info("lipsync loaded", extra={"device": device, "backend": self.renderer.backend})

    def warmup(self) -> None:
        """Start a face tracker (loads MediaPipe's graph) and encode two frames, so the first request is not slow."""
        frame = np.full((128, 128, 3), 128, np.uint8)
        with FaceTracker(25.0) as tracker:
            tracker.track(frame)
        encode_mp4([frame, frame], 25, (128, 128), preset=self.x264_preset, crf=self.crf, x264_params=self.x264_params)

    def health(self) -> EngineHealth:
        """Loaded once its render path is chosen; reports the device and the path (cv2 or torch)."""
        return self.renderer.health() if self.renderer is not None else EngineHealth.down("not loaded")

    def _tracked(self, src: VideoSource, n_frames: int, policy: str, tracker: FaceTracker,
                 stats: dict) -> Iterator[tuple[np.ndarray, Optional[np.ndarray], Optional[Appearance]]]:
        """(frame, refined landmarks or None, appearance) for each output frame in the policy's order: decoding,
        tracking and the interior's colours, measured on one frame in APPEARANCE_EVERY_S and reused."""
        chunk = max(4, min(64, self.chunk_bytes // src.frame_bytes))
        refresh = max(1, int(round(APPEARANCE_EVERY_S * float(src.fps))))
        look: Optional[Appearance] = None
        looked_at = 0
        frames = frames_in_order(src, n_frames, policy, chunk)
        try:
            for i in itertools.count():
                t0 = time.perf_counter()
                item = next(frames, None)
                t1 = time.perf_counter()
                stats["decode_ms"] += (t1 - t0) * 1000
                if item is None:
                    return
                frame = item[1]
                lm = tracker.track(frame)
                if lm is None:
                    look = None  # a cut or a lost face: measure the next face afresh
                else:
                    # The mesh reads an open mouth as less open than it is: its inner lips go to the visible edges.
                    lm = refine_inner_lips(frame, lm)
                    if look is None or i - looked_at >= refresh:
                        look, looked_at = measure_appearance(frame, lm), i
                    else:  # the lips' colour is this frame's: it decides whether its own teeth show
                        lip = lip_colour(frame, lm)
                        look = look if lip is None else look._replace(lip=lip)
                stats["track_ms"] += (time.perf_counter() - t1) * 1000
                yield frame, lm, look
        finally:
            frames.close()

    def _face_work(self, src: VideoSource, controls: Controls, policy: str, stats: dict, faces: int,
                   face_index: int, filmed: Optional[np.ndarray] = None,
                   ) -> Iterator[tuple[np.ndarray, Optional[Encoding], Optional[Controls], float, float]]:
        """(frame, its mouth-only encoding, its controls, close_upper, share of the filmed mouth kept) per output
        frame; no encoding for a frame left as filmed. `filmed` is silence.filmed_weights' per-frame share.
        Decoding and tracking run in their own thread, a few frames ahead of this."""
        widths = MouthWidthReference(window=int(10 * float(src.fps)))
        teeth = TeethBank()
        prev: Optional[Encoding] = None
        with FaceTracker(float(src.fps), max_faces=faces, face_index=face_index) as tracker, \
                ReadAhead(self._tracked(src, controls.n_frames, policy, tracker, stats), name="lipsync-decode") as tracked:
            for i, (frame, lm, look) in enumerate(tracked):
                stats["frames"] = i + 1
                if lm is None:
                    stats["frames_without_face"] += 1
                    yield frame, None, None, 0.0, 0.0
                    continue
                keep = float(filmed[i]) if filmed is not None and i < len(filmed) else 0.0
                if keep >= 1.0:  # a shared silence: the person's own mouth, as filmed
                    stats["frames_as_filmed"] += 1
                    stats["filmed"].append(i)
                    yield frame, None, None, 0.0, 1.0
                    continue
                t1 = time.perf_counter()
                ctl = controls.slice(i, i + 1)
                gap = inner_gap(lm)
                try:
                    if keep > 0.0:  # this frame's own opening, read off the last encoding (or, first, its own)
                        like = prev if prev is not None else encode_from_landmarks(frame, lm, mouth_only=True,
                                                                                   appearance=look, edge_overlap=0.0)
                        ctl = toward_filmed(ctl, replace(like, geometry=replace(like.geometry, rest_gap=gap)), keep)
                    # Closing this frame's mouth needs the low seam and per-column closing (CLOSE_SEAM); opening
                    # it keeps the midline, where the drawn upper teeth belong to the upper lip's side.
                    closing = closes(prev, ctl, gap)
                    # Eyes, brows and smile stay as filmed: only the mouth's fields are built, over the window
                    # they reach (same fields, a fraction of the work).
                    # The filmed lips keep their own edge (encoding.EDGE_OVERLAP: 0 here).
                    enc = encode_from_landmarks(frame, lm, seam=CLOSE_SEAM if closing else 0.5, follow_gap=closing,
                                                mouth_only=True, appearance=teeth.dress(look), edge_overlap=0.0)
                except BadMedia:  # face too small to animate: leave it as filmed
                    stats["frames_without_face"] += 1
                    yield frame, None, None, 0.0, 0.0
                    continue
                prev = enc
                teeth.see(enc)
                c = _width_correction(enc, ctl, widths.update(enc))
                if keep > 0.0:  # the filmed width comes back with the filmed mouth
                    c = replace(c, mouth_spread=(ctl.mouth_spread + (1.0 - keep) * (c.mouth_spread - ctl.mouth_spread)))
                stats["encode_ms"] += (time.perf_counter() - t1) * 1000
                yield frame, enc, c, CLOSE_SEAM if closing else 0.4, keep

    def revoice_frames(self, src: VideoSource, controls: Controls, policy: str, stats: dict,
                       faces: int = 1, face_index: int = 0, filmed: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
        """Yield output frames: each source frame (in the policy's order) with its mouth re-rendered.

        With `faces` > 1 (counted on the first frame), that many are tracked and the `face_index`-th
        by size is the one re-voiced (see FaceTracker). Three stages overlap, each in its own thread: decoding and tracking, the frame's face encoding,
        and (in the caller's thread, with the writes to x264) rendering. ffmpeg's pipes, MediaPipe and
        most NumPy/OpenCV work release the GIL.
        """
        work_items = self._face_work(src, controls, policy, stats, faces, face_index, filmed)
        with ReadAhead(work_items, name="lipsync-face") as work:
            for frame, enc, c, close_upper, keep in work:
                if enc is None:
                    yield frame
                    continue
                t2 = time.perf_counter()
                out = next(iter(self.renderer.frames(enc, c, head_motion=False, close_upper=close_upper)))
                self.renderer.forget(enc)  # an encoding per frame: nothing to keep its layout for
                if keep > 0.0:  # into or out of a shared silence: the filmed mouth fades in with its shape
                    out = cv2.addWeighted(np.ascontiguousarray(frame), keep, np.ascontiguousarray(out), 1.0 - keep, 0.0)
                stats["render_ms"] += (time.perf_counter() - t2) * 1000
                yield out

    def lipsync(self, job: LipSyncJob) -> LipSyncResult:
        """Re-voice the job's video with its audio and encode the MP4 with the new audio (blocking)."""
        started = time.perf_counter()
        src = job.video
        fps = float(src.fps)
        n_audio = max(1, int(round(len(job.audio) / job.sample_rate * fps)))
        # The source's real frame count is known only after decoding; trim can shorten to the probed estimate.
        n_out = plan_length(max(src.estimated_frames(), 1), n_audio, job.length_policy)
        faces = _faces_on_first_frame(src, job.face_index)
        controls = speech_controls(job.audio, job.sample_rate, fps, n_out, job.phonemes, job.timing_source)
        heard = self._source_speech(job)
        new_speech = speech_mask(job.audio, job.sample_rate, n_out, fps)
        # The filmed person opens as wide as they do when they talk (speaker.py), not as the population does.
        t_speaker = time.perf_counter()
        gain = speaker.amplitude(speaker.speaking_gap(src, heard, faces, job.face_index), controls, new_speech)
        speaker_ms = (time.perf_counter() - t_speaker) * 1000
        if gain != 1.0:
            controls = speech_controls(job.audio, job.sample_rate, fps, n_out, job.phonemes, job.timing_source, gain)
        filmed = self._shared_silences(job, n_out, heard, new_speech)
        stats = _new_stats()
        t_drive = time.perf_counter()
        w, h = src.size
        frames = self.revoice_frames(src, controls, job.length_policy, stats, faces, job.face_index, filmed)
        mp4, facts = encode_mp4(frames, src.fps, (w, h), audio=_fit(job.audio, job.sample_rate, n_out, fps),
                                sample_rate=job.sample_rate, preset=self.x264_preset, crf=self.crf, like=src.info,
                                x264_params=self.x264_params)
        n = stats["frames"]
        if n == 0:
            raise BadMedia("video has no decodable frames")
        if stats["frames_without_face"] == n:
            raise BadMedia(_why_no_face(src, n))
        if n < n_out:  # trim with a source shorter than probed: re-encode the audio to the frames we have
            mp4, facts = self._reencode_short(job, src, n, stats, faces, heard, gain)
        total = (time.perf_counter() - started) * 1000
        # Stages overlap (threads): each is the wall time of its own thread, and they can sum to more than the total.
        # "drive" includes "speaker" (the filmed person's own opening, measured before the main pass).
        timings = {"drive": (t_drive - started) * 1000, "speaker": speaker_ms, "decode": stats["decode_ms"],
                   "track": stats["track_ms"],
                   "encode_face": stats["encode_ms"], "render": stats["render_ms"], "encode": facts["encode_ms"],
                   "total": total}
        log.info("lipsync done", extra={"frames": n, "no_face": stats["frames_without_face"], "fps": fps,
                                        "as_filmed": stats["frames_as_filmed"], "policy": job.length_policy,
                                        "speaker_amplitude": round(gain, 3), "ms": round(total)})
        return LipSyncResult(
            mp4=mp4, frames=n, frames_without_face=stats["frames_without_face"], fps=fps, width=w, height=h,
            duration_s=n / fps, source_frames=min(n, src.estimated_frames()) if job.length_policy == "trim" else src.estimated_frames(),
            length_policy=job.length_policy, engine=self.name, timings_ms={k: round(v, 2) for k, v in timings.items()},
            device=self.device, frames_as_filmed=stats["frames_as_filmed"], filmed_spans=_spans(stats["filmed"]),
        )

    @staticmethod
    def _source_speech(job: LipSyncJob) -> Optional[np.ndarray]:
        """Which source frames hear speech on its own soundtrack (silence.source_speech), decoded once per job
        (for the shared silences and the speaker's own opening); None when the soundtrack cannot tell."""
        return source_speech(job.video, max(job.video.estimated_frames(), 1))

    @staticmethod
    def _shared_silences(job: LipSyncJob, n_out: int, heard: Optional[np.ndarray],
                         new_speech: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """Per output frame, the share of the filmed mouth kept (silence.filmed_weights); None to render every frame.

        `heard` is _source_speech(job), `new_speech` speech_mask of the job's audio over the n_out frames.
        """
        if job.silence != "filmed":
            return None
        src, fps = job.video, float(job.video.fps)
        n_source = max(src.estimated_frames(), 1)
        if new_speech is None:
            new_speech = speech_mask(job.audio, job.sample_rate, n_out, fps)
        return filmed_weights(new_speech, heard, n_out, n_source, job.length_policy, fps)

    def _reencode_short(self, job: LipSyncJob, src: VideoSource, n: int, stats: dict, faces: int,
                        heard: Optional[np.ndarray], gain: float = 1.0) -> tuple[bytes, dict]:
        """Redo a job whose source turned out shorter than probed, with the audio cut to its n frames
        (`heard`: _source_speech(job), not decoded again; `gain`: the speaker's amplitude, not measured again)."""
        fps = float(src.fps)
        controls = speech_controls(job.audio, job.sample_rate, fps, n, job.phonemes, job.timing_source, gain)
        stats.update(_new_stats())
        frames = self.revoice_frames(src, controls, "trim", stats, faces, job.face_index,
                                     self._shared_silences(job, n, heard))
        return encode_mp4(frames, src.fps, src.size, audio=_fit(job.audio, job.sample_rate, n, fps),
                          sample_rate=job.sample_rate, preset=self.x264_preset, crf=self.crf, like=src.info,
                          x264_params=self.x264_params)


def _new_stats() -> dict:
    """A job's counters: frames, frames left as filmed (no face; a shared silence), and each stage's wall milliseconds."""
    return {"frames": 0, "frames_without_face": 0, "frames_as_filmed": 0, "filmed": [], "decode_ms": 0.0,
            "track_ms": 0.0, "encode_ms": 0.0, "render_ms": 0.0}


def _spans(frames: list[int]) -> list[tuple[int, int]]:
    """Ascending frame indices as [start, end) runs."""
    out: list[tuple[int, int]] = []
    for i in frames:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _faces_on_first_frame(src: VideoSource, face_index: int) -> int:
    """How many faces the first frame shows (at least 1: a video whose face comes later is tracked as one);
    BadMedia (422) when `face_index` is past them, before any frame is re-voiced."""
    with contextlib.closing(src.forward()) as frames:
        first = next(frames, None)
    faces = L.detect_faces(first) if first is not None else []
    if face_index > 0 or len(faces) > 1:
        choose_face(faces, face_index, "the video's first frame")
    return max(1, len(faces))


def _why_no_face(src: VideoSource, n: int) -> str:
    """Why no frame had a face to follow: none at all, or several (the tracker follows one and finds none
    when two fill the frame side by side), as counted on the first frame by the portrait detector."""
    with contextlib.closing(src.forward()) as frames:
        first = next(frames, None)
    faces = len(L.detect_faces(first)) if first is not None else 0
    if faces > 1:
        return (f"{faces} faces found in the video and none could be followed; lip-sync re-voices one face: "
                "crop the video to the face to re-voice (face_index picks one by size)")
    return f"no face found in any of the video's {n} frames; send a video of a visible, frontal face"


def _fit(audio: np.ndarray, sample_rate: int, n_frames: int, fps: float) -> np.ndarray:
    """Audio cut or zero-padded to exactly n_frames / fps seconds, so the streams end together."""
    n = int(round(n_frames / fps * sample_rate))
    if len(audio) >= n:
        return audio[:n]
    return np.pad(audio, (0, n - len(audio)))
