"""Causal mouth driving for streamed speech, on the code of talking_head/driving.py.

The whole-clip driving (`driving.drive`) sees the whole clip: it low-passes forwards and
backwards and limits the jaw's speed with a backward pass. A live stream cannot wait for the end,
so here every frame is decided once, in order, from what has arrived so far plus a small look-ahead:

- `say` speech arrives a TTS chunk at a time, each whole and with phoneme timings: the chunk's frames
  are driven by the same dominance blending and gates as `drive` (`_mouth_from_phonemes`, evaluated on
  the utterance's phonemes so far at absolute times, so a chunk's first frames continue the previous
  chunk's last ones), `PhonemeTrack`;
- pushed PCM has no timings: a causal envelope (30 ms log energy with a running peak and noise
  floor, mixed with the 1.5-3 kHz band as `drive`'s audio path does) read `lookahead` frames ahead of
  the frame that plays, `EnvelopeTrack`;
- both go through `CausalMouth`, which plays the part of `_limit_speed`: the opening changes by at
  most `_JAW_SPEED / fps` per frame, openings start early enough to reach a target seen in the
  look-ahead, and an m/b/p seal seen in the look-ahead is closed on its frame.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import signal

from gpu_service.talking_head import driving
from gpu_service.talking_head.controls import SPEECH_OPEN, Controls
from gpu_service.talking_head.driving import (EMOTIONS, NOD_PITCH, _JAW_SPEED, _bumps, _mouth_from_phonemes, _phone_tuples,
                                             _split_glides, _stress_times)
from gpu_service.talking_head.visemes import PAUSE, WORD_BOUNDARY, table_arrays

SHAPE_STEP = 0.25
"""Most the rounding, spreading and tuck change per frame (they have no speed limit in `drive`; here
they would jump where a chunk's driving takes over or an interrupt lets go)."""

INTERRUPT_SPEEDUP = 1.75
"""An interrupted mouth closes this much faster than the jaw's speech speed: within 2 frames from the
widest speech opening at 25 fps (the 100 ms the spec allows is 2.5)."""

EMOTION_RAMP_S = 0.3
"""An utterance's emotion eases in and out over this."""

BREATH_HZ = 0.23
"""Idle breathing: the head rises and falls this often (about 14 breaths a minute)."""
BREATH_DY = 0.0035
"""And this much, as a fraction of the face height (with a little pitch)."""


class CausalMouth:
    """The mouth's state frame by frame: speed-limited, anticipating what the look-ahead shows.

    `step(targets, sealed)` takes the targets (speech units: open, round, spread, tuck) of the frame
    now and of the frames after it that are known (the look-ahead), and whether each is an m/b/p seal;
    it returns the frame's mouth and moves on. Like `_limit_speed`, an opening is raised to leave in
    time for a vowel ahead and a closing ends later rather than snapping shut; a seal ahead pulls it
    down in time to be closed on the seal's frame.
    """

    def __init__(self, fps: float) -> None:
        self.fps = float(fps)
        self.jaw_step = _JAW_SPEED / self.fps
        self.state = np.zeros(4)

    def snapshot(self) -> np.ndarray:
        return self.state.copy()

    def restore(self, state: np.ndarray) -> None:
        self.state = np.asarray(state, dtype=np.float64).copy()

    def step(self, targets: Optional[np.ndarray], sealed: Optional[Sequence[bool]] = None,
             fast_close: bool = False) -> np.ndarray:
        """The next frame's mouth (4,) in speech units; targets None (or empty) closes the mouth."""
        prev = self.state
        step = self.jaw_step
        if targets is None or len(targets) == 0:
            cur = np.zeros(4)
            ahead = np.zeros(1)
            seals = np.zeros(1, bool)
        else:
            targets = np.asarray(targets, dtype=np.float64)
            cur = targets[0]
            ahead = targets[:, 0]
            seals = np.zeros(len(targets), bool) if sealed is None else np.asarray(sealed, bool)
        j = np.arange(len(ahead))
        want = float(np.max(ahead - j * step))  # leave in time for an opening ahead (driving's backward pass)
        close_step = step * (INTERRUPT_SPEEDUP if fast_close else 1.0)
        y = max(want, prev[0] - close_step)  # a closing ends later instead of snapping (the forward pass)
        y = min(y, prev[0] + step)  # what the look-ahead saw too late still opens at the jaw's speed
        if seals.any():
            y = min(y, float(np.min(j[seals] * step)))  # closed on the seal's frame, approached at the jaw's speed
        if fast_close or targets is None or len(targets) == 0:
            y = min(y, max(prev[0] - close_step, 0.0))
        out = np.empty(4)
        out[0] = float(np.clip(y, 0.0, 1.0))
        out[1:] = prev[1:] + np.clip(cur[1:] - prev[1:], -SHAPE_STEP, SHAPE_STEP)
        out[1:] = np.clip(out[1:], 0.0, 1.0)
        self.state = out
        return out.copy()


class EmotionRamp:
    """The face's emotion (smile, brow, eye_open, dynamics scale), easing from one to the next."""

    def __init__(self, fps: float, emotion: str = "neutral") -> None:
        self.base = np.array(EMOTIONS[emotion], dtype=np.float64)
        self.state = self.base.copy()
        self.step = 1.0 / max(1.0, EMOTION_RAMP_S * fps)

    def snapshot(self) -> np.ndarray:
        return self.state.copy()

    def restore(self, state: np.ndarray) -> None:
        self.state = np.asarray(state, dtype=np.float64).copy()

    def next(self, emotion: Optional[str]) -> np.ndarray:
        """The next frame's values, moving towards `emotion` (None: the session's own) by at most `step`."""
        goal = self.base if emotion is None else np.array(EMOTIONS[emotion], dtype=np.float64)
        self.state = self.state + np.clip(goal - self.state, -self.step, self.step)
        return self.state.copy()


def breathing(index: np.ndarray | int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(head_dy, head_pitch) of idle breathing at frame indices (a slow sine, zero at frame 0)."""
    t = (np.asarray(index, dtype=np.float64) + 0.5) / fps
    wave = np.sin(2 * np.pi * BREATH_HZ * t) - np.sin(2 * np.pi * BREATH_HZ * 0.5 / fps)
    return BREATH_DY * wave, 0.004 * wave


NOD_STEP = 0.2
"""Most the nod's strength changes per frame (a nod cut short by an interrupt eases out)."""


def frame_controls(fps: float, index: int, mouth: np.ndarray, emotion: np.ndarray, nod: float = 0.0) -> Controls:
    """One frame of controls: the mouth (speech units), the emotion's face, breathing, and a nod of the head and a
    lift of the brows on stressed syllables (as `drive` does); the engine's stream adds blinks and head drift
    (open_stream's idle_seed)."""
    ctl = Controls.neutral(1, float(fps))
    ctl.mouth_open[:] = float(np.clip(mouth[0], 0.0, 1.0)) * SPEECH_OPEN
    ctl.mouth_round[:] = mouth[1]
    ctl.mouth_spread[:] = mouth[2]
    ctl.lip_tuck[:] = mouth[3]
    ctl.smile[:] = emotion[0]
    ctl.brow[:] = np.clip(emotion[1] + 0.12 * nod, -1.0, 1.0)
    ctl.eye_open[:] = emotion[2]
    dy, pitch = breathing(index, fps)
    ctl.head_dy[:] = dy + 0.004 * nod
    ctl.head_pitch[:] = pitch + NOD_PITCH * nod
    return ctl


# -- speech with phoneme timings (say) ---------------------------------------------------------
class PhonemeTrack:
    """Mouth targets of an utterance whose audio comes in whole chunks with phoneme timings.

    Times are seconds from the utterance's start, frame k's centre at (k + 0.5) / fps. Targets of a
    frame are computed once all of its audio is in (or the utterance is over), from every phoneme
    known then within a second of it, so a frame near a chunk's end is shaped by the next chunk's
    first phonemes when they have arrived, and frames already decided never change.
    """

    CONTEXT_S = 1.0

    def __init__(self, fps: float) -> None:
        self.fps = float(fps)
        self.phones: list[tuple[str, float, float]] = []
        self.covered_s = 0.0
        """Seconds of audio whose phonemes are known."""
        self.ended = False
        self._targets: list[np.ndarray] = []
        self._sealed: list[bool] = []
        self._first = 0  # phones before this one ended long before the frames still to decide
        self.stress: list[tuple[float, float]] = []

    def add(self, phonemes: Sequence, until_s: float) -> None:
        """Phonemes (Phone or tuples, utterance times) of audio up to `until_s`: one chunk, whole."""
        new = _split_glides(_phone_tuples(phonemes))
        self.phones.extend(new)
        self.covered_s = max(self.covered_s, float(until_s))
        spoken = [p for p in new if p[0] not in (PAUSE, WORD_BOUNDARY)]
        if spoken:  # the chunk's stressed syllables, as drive() finds them in a clip
            targets, _, _ = table_arrays([p[0] for p in spoken])
            self.stress.extend(_stress_times(spoken, targets[:, 0]))

    def nod(self, k: int) -> float:
        """The nod (0..1) on frame k from the stressed syllables around it."""
        t = (k + 0.5) / self.fps
        near = [e for e in self.stress if abs(e[0] - t) < 0.6]
        return float(_bumps(np.array([t]), near)[0]) if near else 0.0

    def end(self) -> None:
        self.ended = True

    def known_frames(self) -> int:
        """Frames whose targets are decided (computed on demand)."""
        n = int(np.floor(self.covered_s * self.fps + 1e-9))
        if self.ended:
            n = int(np.ceil(self.covered_s * self.fps - 1e-9))
        self._extend(n)
        return len(self._targets)

    def _extend(self, n: int) -> None:
        k0 = len(self._targets)
        if n <= k0:
            return
        t = (np.arange(k0, n) + 0.5) / self.fps
        lo, hi = t[0] - self.CONTEXT_S, t[-1] + self.CONTEXT_S
        while self._first < len(self.phones) and self.phones[self._first][2] < lo:
            self._first += 1
        near = [p for p in self.phones[self._first:] if p[2] >= lo and p[1] <= hi]
        spoken = [p for p in near if p[0] not in (PAUSE, WORD_BOUNDARY)]
        if not spoken:
            mouth, sealed = np.zeros((len(t), 4)), []
        else:
            # Evaluated on the whole window of phonemes, then cut to the new frames: the same values
            # the whole-clip driving gives them (up to the window), so chunks join without a step.
            # _mouth_from_phonemes indexes frames from t = 0: the window is moved to start there (by whole frames).
            base = k0 / self.fps
            local = [(sym, a - base, b - base) for sym, a, b in near]
            mouth, sealed = _mouth_from_phonemes(local, t - base, self.fps)
        seal = np.zeros(len(t), bool)
        seal[[s for s in sealed if s < len(t)]] = True
        self._targets.extend(np.clip(mouth, 0.0, 1.0))
        self._sealed.extend(seal.tolist())

    def targets(self, k: int, lookahead: int) -> tuple[np.ndarray, np.ndarray]:
        """Targets and seals of frames k .. k + lookahead that are known (k must be known)."""
        n = self.known_frames()
        stop = min(n, k + 1 + lookahead)
        rows = self._targets[k:stop]
        return (np.stack(rows) if rows else np.zeros((0, 4))), np.array(self._sealed[k:stop], bool)


# -- speech as pushed PCM (no timings) ---------------------------------------------------------
class EnvelopeTrack:
    """Mouth targets from the audio alone, causally: each frame's from the audio up to its window's end.

    The loudness is a 30 ms log energy normalised between a running noise floor and a running peak
    (instead of the clip's percentiles), mixed 40/60 with the level of the 1.5-3 kHz band as in
    `drive`'s audio path, and gated below 0.02. Samples are 48 kHz mono float32.
    """

    WINDOW_S = 0.03
    PEAK_DECAY_DB_S = 3.0
    FLOOR_RISE_DB_S = 2.0
    RANGE_DB = 35.0

    def __init__(self, fps: float, sample_rate: int) -> None:
        self.fps = float(fps)
        self.sr = int(sample_rate)
        self.spf = self.sr / self.fps
        self._audio = np.zeros(0, np.float32)
        self._band = np.zeros(0, np.float32)
        self._start = 0  # sample index of _audio[0] (and _band[0]): samples no window needs any more are dropped
        self._total = 0
        nyq = 0.5 * self.sr
        self._sos = signal.butter(2, [1500.0 / nyq, 3000.0 / nyq], btype="band", output="sos")
        self._zi = signal.sosfilt_zi(self._sos) * 0.0
        self.ended = False
        self._targets: list[np.ndarray] = []
        self._peak = {"all": -60.0, "band": -70.0}
        self._floor = {"all": -70.0, "band": -80.0}

    def push(self, samples: np.ndarray) -> None:
        x = np.asarray(samples, dtype=np.float32)
        if not len(x):
            return
        band, self._zi = signal.sosfilt(self._sos, x, zi=self._zi)
        keep = max(0, int(round((len(self._targets) + 0.5) * self.spf)) - int(self.WINDOW_S * self.sr) - self._start)
        self._audio = np.concatenate([self._audio[keep:], x])
        self._band = np.concatenate([self._band[keep:], band.astype(np.float32)])
        self._start += keep
        self._total += len(x)

    def end(self) -> None:
        self.ended = True

    def _window_db(self, x: np.ndarray, centre: int) -> float:
        half = int(self.WINDOW_S * self.sr / 2)
        centre -= self._start
        seg = x[max(0, centre - half): max(0, centre + half)]
        return float(10.0 * np.log10(np.mean(np.square(seg, dtype=np.float64)) + 1e-12)) if len(seg) else -120.0

    def _level(self, db: float, key: str) -> float:
        dt = 1.0 / self.fps
        if db > self._peak[key]:
            self._peak[key] = db
        else:
            self._peak[key] = max(self._peak[key] - self.PEAK_DECAY_DB_S * dt, self._floor[key] + 12.0)
        if db < self._floor[key]:
            self._floor[key] = db
        else:
            self._floor[key] = min(self._floor[key] + self.FLOOR_RISE_DB_S * dt, self._peak[key] - 12.0)
        gate = max(self._floor[key] + 6.0, self._peak[key] - self.RANGE_DB)
        if self._peak[key] < -55.0:
            return 0.0
        return float(np.clip((db - gate) / max(self._peak[key] - gate, 1e-6), 0.0, 1.0))

    def known_frames(self) -> int:
        """Frames whose targets can be decided: their whole window is in (all, once the utterance ended)."""
        half = int(self.WINDOW_S * self.sr / 2)
        if self.ended:
            n = int(np.ceil(self._total / self.spf - 1e-9))
        else:
            n = int(np.floor((self._total - half) / self.spf - 0.5)) + 1
        while len(self._targets) < n:
            k = len(self._targets)
            centre = int(round((k + 0.5) * self.spf))
            env = self._level(self._window_db(self._audio, centre), "all")
            lips = self._level(self._window_db(self._band, centre), "band")
            opening = 0.4 * env + 0.6 * lips
            prev = self._targets[-1][0] if self._targets else 0.0
            opening = 0.5 * opening + 0.5 * prev if opening < prev else opening  # a softer fall, as the low-pass
            if opening < 0.02:
                opening = 0.0
            self._targets.append(np.array([opening, 0.0, 0.0, 0.0]))
        return len(self._targets)

    def targets(self, k: int, lookahead: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.known_frames()
        stop = min(n, k + 1 + lookahead)
        rows = self._targets[k:stop]
        return (np.stack(rows) if rows else np.zeros((0, 4))), np.zeros(len(rows), bool)


__all__ = ["CausalMouth", "EmotionRamp", "PhonemeTrack", "EnvelopeTrack", "frame_controls", "breathing", "driving"]
