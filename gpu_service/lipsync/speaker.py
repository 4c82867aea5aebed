"""The filmed person's own opening when they talk: lip-sync opens the new speech's mouth as wide as they do.

Driving opens every mouth to one population's widest conversational opening (controls.SPEECH_OPEN,
0.0865 face heights), but people differ: the kit's GRID talkers' own p95 gaps while speaking are
0.111, 0.067 and 0.060 face heights (v01, v02, v03: the renderer's own measure, the mesh's inner lips
moved out to the visible opening). A re-voiced person should open like themselves, and the source
shows how: over the frames its own soundtrack speaks in, the p95 of its inner-lip gap, against the
p95 the new speech's controls ask for, is the speaker's amplitude (drive's `amplitude`).

The estimate is shrunk halfway to 1 (the geometric mean of the two), so a short or unusual stretch of
the source moves the mouth part of the way, and kept within AMPLITUDE_RANGE. Measured by self-
reenactment through the service (`python -m evaluator reenact`): v01/v02/v03 get 1.31/0.92/0.99, and
their lip-sync amp went 0.70/1.15/0.98 -> 0.85/1.07/0.97 (MediaPipe), 0.77/1.15/0.88 -> 0.90/0.96/0.91
with the unrefined mesh the realism issue measured with, where v01's r went 0.45 -> 0.61 and his lmd
over a still mouth's 0.97 -> 0.71; re-voiced with another clip's speech v01 gets 1.17. In
self-reenactment the clip is its own calibration, so its lip-sync amp is no longer an independent
check: the talking head's is.

Cost: the source's first frames are decoded once more, up to the last one sampled, and SAMPLES of them
tracked: 0.12 s on the kit's 360x288 v01, 0.27 s on it scaled to 720p (speaking from 0.6 s); the
720p benchmark with the clip's soundtrack (`benchmarks/bench_lipsync.py --soundtrack`) ran at 0.98x.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import numpy as np

from gpu_service.errors import BadMedia
from gpu_service.lipsync.mouth import inner_gap, refine_inner_lips
from gpu_service.lipsync.stream_io import VideoSource
from gpu_service.lipsync.tracking import FaceTracker
from gpu_service.talking_head import landmarks as L
from gpu_service.talking_head.controls import Controls

log = logging.getLogger(__name__)

SAMPLES = 16
"""Source frames tracked for the estimate, at most."""
STEP = 3
"""Every STEP-th speaking frame is sampled (neighbouring frames say almost the same)."""
WINDOW_S = 10.0
"""Only speaking frames within the source's first WINDOW_S seconds are sampled: the frames before the
last one sampled are decoded once more, and a long clip whose person starts speaking late must not be."""
MIN_SAMPLES = 6
"""Fewer speaking frames with a face than this: no estimate, amplitude 1."""
SHRINK = 0.5
"""The estimate's weight against 1, in log terms (0.5: the geometric mean of the measured ratio and 1)."""
AMPLITUDE_RANGE = (0.75, 1.4)
"""The amplitude is kept within this range."""
FRONTAL_MAX_GAP = 0.22
"""mouth_open = 1 on a frontal face, in face heights (encoding's g_max; controls.SPEECH_OPEN's 0.22)."""


def speaking_gap(src: VideoSource, heard: Optional[np.ndarray], faces: int = 1, face_index: int = 0) -> Optional[float]:
    """p95 of the source's own inner-lip gap (face heights) over sampled frames its soundtrack speaks in (in its
    first WINDOW_S); None without enough.

    `heard` is silence.source_speech's per-source-frame mask (None: the soundtrack cannot tell).
    """
    if heard is None:
        return None
    window = int(round(WINDOW_S * float(src.fps)))
    picked = np.flatnonzero(np.asarray(heard, bool)[:window])[::STEP][:SAMPLES]
    if len(picked) < MIN_SAMPLES:
        return None
    want = set(int(i) for i in picked)
    gaps: list[float] = []
    try:
        with FaceTracker(float(src.fps), smooth=False, max_faces=faces, face_index=face_index) as tracker, \
                contextlib.closing(src.first(int(picked[-1]) + 1)) as frames:
            for i, frame in enumerate(frames):
                if i not in want:
                    continue
                lm = tracker.raw(frame)
                if lm is None:
                    continue
                lm = refine_inner_lips(frame, lm)
                height = float(np.linalg.norm(lm[L.CHIN] - lm[L.FOREHEAD]))
                if height > 1.0:
                    gaps.append(inner_gap(lm) / height)
    except (BadMedia, OSError) as exc:  # the estimate only refines the result; the main pass reports a bad video
        log.warning("speaker's opening not measured; the population's is used", extra={"why": str(exc)[:200]})
        return None
    if len(gaps) < MIN_SAMPLES:
        return None
    return float(np.percentile(gaps, 95))


def amplitude(own_gap: Optional[float], controls: Controls, new_speech: Optional[np.ndarray]) -> float:
    """drive's `amplitude` for a speaker whose own p95 gap is `own_gap`, from controls driven at amplitude 1.

    `new_speech` marks the output frames where the new speech is heard (driving.speech_mask); 1 without
    an estimate or speech to compare with.
    """
    if own_gap is None or new_speech is None:
        return 1.0
    talking = np.asarray(new_speech[:controls.n_frames], bool)
    if talking.sum() < MIN_SAMPLES:
        return 1.0
    asked = float(np.percentile(controls.mouth_open[:len(talking)][talking], 95)) * FRONTAL_MAX_GAP
    if asked <= 1e-4:
        return 1.0
    lo, hi = AMPLITUDE_RANGE
    return float(np.clip((own_gap / asked) ** SHRINK, lo, hi))
