"""Shared silences: where neither the filmed person nor the new speech says anything, the mouth stays as filmed.

A person at rest between phrases is the one thing the source shows exactly as the new speech
wants it: quiet. Their real mouth there (lips parted for breath, a swallow, a smile) is more like
them than any rendered rest, so those frames are passed through, and the frames around them blend
from the filmed mouth into the rendered one: the controls move towards "this frame's own opening"
(nothing warped) and the pixels cross-fade, so neither the shape nor the interior switches in one frame.

Who is silent when is read from the two soundtracks with the audio-only driving's speech mask
(driving.speech_mask): the new speech for each output frame, the source's own track for the source
frame it shows (after loop or pingpong). A source without an audio track, or whose track is silent
throughout, says nothing about when its person speaks, and every frame is rendered, as before.

Measured by self-reenactment through the service (`python -m evaluator reenact`): v01's talker sits
with his lips parted (MediaPipe gap 0.04-0.09 face heights) for the 0.6 s before he speaks, where the
rendered rest read 0.001-0.02. His lip-sync lmd over a still mouth's went 0.83 -> 0.72 (v02 0.61 ->
0.56, v03 0.47 -> 0.37), with the first 7 of his 75 frames kept. The frames kept are counted in the
result (`frames_as_filmed`), and `silence=rendered` in the request renders every frame.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import replace
from typing import Optional

import numpy as np

from gpu_service.lipsync.stream_io import VideoSource, decode_pcm, source_index
from gpu_service.talking_head.controls import Controls
from gpu_service.talking_head.driving import speech_mask
from gpu_service.talking_head.encoding import Encoding
from gpu_service.talking_head.renderer import mode_weights

log = logging.getLogger(__name__)

SILENCE_MODES = ("filmed", "rendered")
MARGIN_S = 0.1
"""A frame this close to anyone's speech is not a shared silence: lips prepare for speech and relax after it
(the driving's own _PAUSE_PREPARE_S and _PAUSE_RELAX_S)."""
RAMP_S = 0.12
"""Past the margin, the filmed mouth takes over over this long (3 frames at 25 fps)."""
_RATE = 16000


def source_speech(src: VideoSource, n_frames: int) -> Optional[np.ndarray]:
    """Which of the source's first n_frames hear speech on its own soundtrack; None when it has none to tell."""
    if src.info.audio_codec is None or n_frames < 1:
        return None
    try:
        res = decode_pcm(src.path, _RATE)
    except (OSError, subprocess.TimeoutExpired) as exc:  # the soundtrack only refines the result: never fail on it
        log.warning("source soundtrack not decoded; every frame's mouth is rendered", extra={"why": str(exc)[:200]})
        return None
    audio = np.frombuffer(res.stdout, np.float32)
    if res.returncode != 0 or audio.size < _RATE // 10:
        log.info("source soundtrack unreadable; every frame's mouth is rendered", extra={"rc": res.returncode})
        return None
    return speech_mask(audio, _RATE, n_frames, float(src.fps))


def filmed_weights(new_speech: Optional[np.ndarray], src_speech: Optional[np.ndarray], n_out: int, n_source: int,
                   policy: str, fps: float) -> Optional[np.ndarray]:
    """Per output frame, how much of the filmed mouth to keep (0 rendered .. 1 as filmed); None when nothing is kept.

    `new_speech` is over the output frames (None: the new audio is silent throughout, which the
    service refuses anyway), `src_speech` over the source's frames (None: unknown, keep nothing).
    """
    if src_speech is None or new_speech is None or n_out < 1:
        return None
    idx = np.array([source_index(i, n_source, policy) for i in range(n_out)])
    filmed_talks = np.where(idx < len(src_speech), src_speech[np.minimum(idx, len(src_speech) - 1)], True)
    quiet = ~(new_speech[:n_out] | filmed_talks)
    if not quiet.any():
        return None
    # Distance (s) from each frame to the nearest frame where someone speaks (beyond the ends: nobody).
    frames = np.arange(n_out)
    loud = np.flatnonzero(~quiet)
    if loud.size == 0:
        dist = np.full(n_out, np.inf)
    else:
        right = np.searchsorted(loud, frames)
        before = np.where(right > 0, frames - loud[np.maximum(right - 1, 0)], np.inf)
        after = np.where(right < loud.size, loud[np.minimum(right, loud.size - 1)] - frames, np.inf)
        dist = np.minimum(before, after) / fps
    w = np.clip((dist - MARGIN_S) / RAMP_S, 0.0, 1.0)
    return w if w.any() else None


def toward_filmed(c: Controls, like: Encoding, w: float) -> Controls:
    """One frame's controls moved a share `w` of the way to "keep this frame's own mouth" (no mouth warp).

    `like` is an encoding with this frame's inner-lip gap as its rest gap. The opening that warps
    nothing is read from the renderer's own mapping (mode_weights), so it stays right if the
    mapping's constants change; rounding, spreading and tucking fade out with the same share.
    """
    opens = np.linspace(0.0, 1.2, 121, dtype=np.float32)
    probe = Controls.neutral(len(opens), c.fps)
    probe.mouth_open[:] = opens
    jaw = mode_weights(like, probe)[:, 0]
    keep = float(np.interp(0.0, jaw, opens)) if jaw[0] < 0.0 < jaw[-1] else 0.0
    k = 1.0 - w
    return replace(c, mouth_open=(k * c.mouth_open + w * keep).astype(np.float32),
                   mouth_round=(k * c.mouth_round).astype(np.float32),
                   mouth_spread=(k * c.mouth_spread).astype(np.float32),
                   lip_tuck=(k * c.lip_tuck).astype(np.float32))
