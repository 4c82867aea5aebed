"""Driving: speech (phoneme timings and/or audio) to per-frame face controls.

Pure numpy/scipy and fast (a 60 s clip drives in a few milliseconds). The output is sampled at
frame centres, t_i = (i + 0.5) / fps, so frame i shows what is heard in the middle of its span.

Mouth from phonemes: every phoneme has a viseme (targets + dominances, see visemes.py; a
diphthong is its nucleus and a marked offglide). The mouth parameters at time t are the
dominance-weighted average of the targets of all phonemes (Cohen-Massaro coarticulation), each
dominance easing in before its phoneme and out after it. Hard constraints are then applied as
multiplicative gates: the lips are sealed at the centre of every m/b/p (the frame containing the
centre reads exactly 0), a /w/ all but closes them, and inside pauses the mouth relaxes to closed
over ~100 ms. The opening and the seals run _LIP_LEAD_S ahead of synthesised speech's phoneme
timings (Piper's spans lag its sound); timings found in the audio itself sit where the lips act
and get no lead (lip_lead).

Mouth from audio alone: loudness (30 ms log energy, noise gated and normalised by percentiles)
mixed with the level of the band where open lips radiate (1.5-3 kHz), zero-phase smoothed, and
closed further by the spectral rounding cue (the F2 band against the low band in voiced frames),
which also drives rounding vs spreading. Noise blips and stop closures are not speech turns.

Both: the opening is in speech units (1 = the widest opening of conversational speech, scaled
to the renderer's range by controls.SPEECH_OPEN), its speed is capped at _JAW_SPEED everywhere,
seals included, and before the clip's first words the lips part for an in-breath.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import re
import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from scipy import fft as sp_fft
from scipy import signal

from gpu_service.errors import ValidationFailed
from gpu_service.talking_head.controls import SPEECH_OPEN, Controls
from gpu_service.talking_head.visemes import OFFGLIDE, PAUSE, WORD_BOUNDARY, glides, is_offglide, table_arrays

log = logging.getLogger(__name__)

# emotion -> (smile, brow, eye_open, mouth dynamics scale), after the facial actions that show each
# (FACS): happy pulls the corners up and narrows the eyes a little (cheeks raised); sad turns the
# corners down, lowers the brows and the lids; angry lowers the brows hard and narrows the eyes;
# surprised and fearful raise the brows and widen the eyes (fear with the corners stretched down);
# disgusted lowers the brows, narrows the eyes, turns the corners down. Measured on p05 by
# tests/talking_head/test_emotions.py (sad lowers its brows by 0.45: at 0.3 MediaPipe read 0.002 face heights once
# the narrowed lid was drawn as light as the skin around the eye, where 0.005 is the visible bound).
EMOTIONS: dict[str, tuple[float, float, float, float]] = {
    "neutral": (0.0, 0.0, 0.0, 1.0),
    "happy": (0.7, 0.1, -0.2, 1.05),
    "sad": (-0.5, -0.45, -0.4, 0.8),
    "angry": (-0.3, -0.9, -1.0, 1.1),
    "surprised": (0.0, 1.0, 1.0, 1.15),
    "fearful": (-0.3, 0.9, 1.0, 0.9),
    "disgusted": (-0.45, -0.55, -0.8, 0.9),
}
VALID_EMOTIONS = tuple(EMOTIONS) + ("auto",)

# Keyword lexicon for emotion="auto". A word scores 1 for its emotion; emoticons score 2.
# Punctuation adds small cues: "?!" or "!?" -> surprised +1. Highest score wins; ties and no
# evidence fall back to neutral. Deliberately small: it catches explicit wording, nothing subtle.
_LEXICON: dict[str, tuple[str, ...]] = {
    "happy": ("happy", "glad", "great", "wonderful", "love", "lovely", "delighted", "awesome", "fantastic",
              "joy", "excited", "yay", "thanks", "thank", "congratulations", "enjoy", "smile", "fun", "cheerful"),
    "sad": ("sad", "sorry", "unfortunately", "miss", "lost", "cry", "crying", "unhappy", "grief", "regret",
            "lonely", "depressed", "heartbroken", "tragic", "alas"),
    "angry": ("angry", "furious", "hate", "mad", "annoyed", "outrageous", "unacceptable", "stop", "damn",
              "irritated", "rage", "enough"),
    "surprised": ("wow", "whoa", "surprised", "surprise", "unbelievable", "incredible", "amazing", "really",
                  "oh", "suddenly", "astonishing"),
    "fearful": ("afraid", "scared", "fear", "terrified", "frightened", "worried", "nervous", "danger", "help",
                "panic", "anxious"),
    "disgusted": ("disgusting", "gross", "yuck", "eww", "ew", "revolting", "nasty", "disgusted", "sick"),
}
_EMOTICONS = {":)": "happy", ":-)": "happy", ":D": "happy", ":(": "sad", ":-(": "sad", ":o": "surprised"}
_WORD = re.compile(r"[a-z']+")


class UnknownEmotion(ValidationFailed, ValueError):
    """An emotion name that driving does not know (a 422 through the service's error table)."""


def infer_emotion(text: Optional[str]) -> str:
    """Pick an emotion from text with the small keyword/emoticon/punctuation lexicon; neutral if unsure."""
    if not text:
        return "neutral"
    scores = dict.fromkeys(_LEXICON, 0.0)
    for icon, emo in _EMOTICONS.items():
        scores[emo] += 2.0 * text.count(icon)
    words = [w.strip("'").removesuffix("'s") for w in _WORD.findall(text.lower())]
    words = [w[:-1] if w.endswith("'m") else w for w in words]
    for emo, keys in _LEXICON.items():
        scores[emo] += sum(1.0 for w in words if w in keys)
    if "?!" in text or "!?" in text:
        scores["surprised"] += 1.0
    best = max(scores.values())
    winners = [e for e, s in scores.items() if s == best]
    return winners[0] if best > 0 and len(winners) == 1 else "neutral"


def resolve_emotion(emotion: str, text: Optional[str] = None) -> str:
    """Validate an emotion name (or resolve "auto" from text); UnknownEmotion names the valid ones."""
    name = (emotion or "neutral").strip().lower()
    if name == "auto":
        return infer_emotion(text)
    if name not in EMOTIONS:
        raise UnknownEmotion(f"unknown emotion {emotion!r}; valid emotions: {list(VALID_EMOTIONS)}")
    return name


# -- small signal helpers ---------------------------------------------------------------------
def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _zero_phase_lowpass(x: np.ndarray, fps: float, cutoff_hz: float, order: int = 2) -> np.ndarray:
    """Butterworth low-pass run forwards and backwards (no lag); returns x when too short."""
    nyq = 0.5 * fps
    if cutoff_hz >= 0.95 * nyq or len(x) < 3 * (2 * order + 1) + 1:
        return x.copy()
    sos = signal.butter(order, cutoff_hz / nyq, btype="low", output="sos")
    return signal.sosfiltfilt(sos, x)


# -- inputs -----------------------------------------------------------------------------------
def _phone_tuples(phonemes: Iterable) -> list[tuple[str, float, float]]:
    """Accept Phone objects or (phoneme, start_s, end_s) tuples; ValidationFailed on bad spans."""
    out = []
    for i, p in enumerate(phonemes):
        if hasattr(p, "phoneme"):
            sym, s, e = p.phoneme, p.start_s, p.end_s
        else:
            try:
                sym, s, e = p
            except (TypeError, ValueError):
                raise ValidationFailed(f"phonemes[{i}] must be a Phone or (phoneme, start_s, end_s)") from None
        s, e = float(s), float(e)
        if not (np.isfinite(s) and np.isfinite(e)) or e < s or s < 0:
            raise ValidationFailed(f"phonemes[{i}] {sym!r} has an invalid span [{s}, {e}]")
        out.append((str(sym), s, e))
    return out


def _split_glides(phones: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """Diphthongs as nucleus and marked offglide (visemes.glides): one symbol split 60/40, Piper's pairs marked."""
    out: list[tuple[str, float, float]] = []
    for sym, s, e in phones:
        parts = glides(sym)
        if len(parts) == 2:
            m = s + 0.6 * (e - s)
            out += [(parts[0], s, m), (parts[1], m, e)]
        elif out and abs(out[-1][2] - s) < 1e-3 and is_offglide(out[-1][0], sym):
            out.append((sym + OFFGLIDE, s, e))
        else:
            out.append((sym, s, e))
    return out


def _mono(audio, sample_rate) -> tuple[np.ndarray, int]:
    if sample_rate is None or not np.isfinite(sample_rate) or int(sample_rate) < 1000:
        raise ValidationFailed(f"sample_rate must be given with audio and be >= 1000 Hz, got {sample_rate!r}")
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 2:
        # Either (samples, channels) or (channels, samples): the longer axis is time.
        a = a.mean(axis=1) if a.shape[0] >= a.shape[1] else a.mean(axis=0)
    if a.ndim != 1 or a.size == 0:
        raise ValidationFailed("audio must be a non-empty mono or multi-channel array")
    if not np.all(np.isfinite(a)):
        raise ValidationFailed("audio contains NaN or infinite samples")
    return a, int(sample_rate)


# -- mouth from phonemes ----------------------------------------------------------------------
_ANTICIPATION_S = 0.06  # dominance decay constant before a phoneme (lips prepare early)
_CARRYOVER_S = 0.045  # and after it
_CLOSURE_RAMP_S = 0.06  # lips approach a bilabial closure over this
_RELEASE_S = 0.04  # and release it faster
_LABIAL_OPEN = 0.1  # a /w/ keeps this share of the opening around it
_LABIAL_RAMP_S = 0.08  # approached over this (rounding starts during the consonant before it)
# and left as slowly: a /w/ is a glide, not a burst. The kit's talkers open out of the /w/ of "white"
# over two frames (v02 +0.029 then +0.026 face heights, v03 +0.034 then +0.022); released as fast as a
# stop (0.04 s), v03's re-voiced mouth opened by 0.060 in one frame once its timing matched the talker's.
_LABIAL_RELEASE_S = 0.08
_PAUSE_RELAX_S = 0.10  # the mouth relaxes to closed over this after speech stops
_PAUSE_PREPARE_S = 0.10  # and reopens this long before speech resumes
# A silence between words shorter than this is no pause: a stop's closure, or the short gap a phone
# recogniser marks between words, where a talker's lips do not relax (v01 holds its mouth at 0.09-0.11
# face heights through a 0.08 s gap that closed ours to a quarter of speaking-wide). Its "_" is
# dropped and the words on either side blend across it, as the audio-only path bridges gaps below
# 0.15 s (_speech_runs); the evaluator checks pauses only from 0.2 s (PAUSE_SETTLE_S + PAUSE_PREPARE_S).
_SHORT_PAUSE_S = 0.15
# Phoneme timings mark acoustic segments, but the lips reach each shape a little before its sound
# (a CV syllable's energy starts with the consonant, while the jaw is already opening for the vowel).
# On Piper speech the phoneme spans lag the speech envelope by 10-30 ms (a stop's silence comes
# ~20 ms before its span's centre) and the mouth read one frame late; the opening and the m/b/p
# seals lead by this much, and the frame holding each m/b/p centre is still closed exactly.
_LIP_LEAD_S = 0.025
# Timings found in the audio (alignment.py: forced alignment, phone recognition) are acoustic
# boundaries, and a stop's span ends at its burst, where the filmed lips part: v02's /b/ of "by"
# bursts at 1.16 s and v03's /p/ at 1.33 s, the recognised spans end there, and the talkers' lips
# open between the frames either side (MediaPipe gap 0.006 -> 0.042 and 0.001 -> 0.023). With the
# lead, the evaluator's reenact put our mouth one frame ahead of the real one on all six runs (head
# and lip-sync of v01-v03, best lag -1); without it, at lag 0 on five. At control level (mouth_open
# against the real gap at lag 0, mean of v01-v03), shifting recognised timings later by the lead
# raises r from 0.68 to 0.73; on forced alignment it changes nothing (0.709 and 0.712).
ACOUSTIC_TIMINGS = ("forced_alignment", "phone_recognition")


def lip_lead(timing_source: Optional[str]) -> float:
    """How far the mouth runs ahead of phoneme timings of this source (seconds): none for timings found in the audio."""
    return 0.0 if timing_source in ACOUSTIC_TIMINGS else _LIP_LEAD_S

# The jaw's and lips' top speed, in speech units (visemes.py) per second: 0 -> 1 in 135 ms, an
# inner-lip gap changing by at most 0.026 face heights per 40 ms frame (7.4 x 0.04 x SPEECH_OPEN x 0.22). Real talkers' gaps change
# by at most 0.017-0.049 per frame (the kit's measures; MediaPipe reads more where a moustache
# makes thin openings snap shut, 0.087 on the kit's v01, and reads ours alike); an opening from
# closed to wide in one frame is what makes a mouth look mechanical. It holds everywhere, m/b/p
# seals included: the lips close into a seal and release from it at this speed.
_JAW_SPEED = 7.4
# Before its first words, after a lead-in long enough to breathe in, a speaker's lips part (an oral
# in-breath) a few hundred ms ahead of the sound: the kit's GRID talkers all sit open at 0.3-0.95
# of their speaking p95 before they start (MediaPipe over the 8 frames before the first sound: 0.73,
# 0.54, 0.87 on v01-v03). A breath of 0.4 speech units read as 0.01-0.38 of the output's own p95 on
# those clips' portraits (MediaPipe reads a thin drawn opening as thinner still, and as shut under a
# moustache); 0.55 reads as 0.48-0.50 where the lips are bare, inside the talkers' range and still
# well below speaking-wide. Pauses inside a clip relax to closed (the spec's ~100 ms; Piper's between
# sentences last 0.1-0.35 s), where the evaluator checks that they are closed.
_BREATH_MIN_LEAD_S = 0.4
_BREATH_LEAD_S = 0.5
_BREATH_OPEN = 0.55


def _pause_spans(phones: list[tuple[str, float, float]]) -> list[tuple[float, float]]:
    """Silent spans: runs of adjacent pauses and word boundaries that contain at least one pause.

    Piper ends one sentence with "_" and starts the next with another, often with a word
    boundary in between; together they are one silence.
    """
    spans: list[tuple[float, float]] = []
    run: list[tuple[str, float, float]] = []
    for p in phones + [("x", np.inf, np.inf)]:
        if p[0] in (PAUSE, WORD_BOUNDARY) and (not run or p[1] - run[-1][2] < 1e-3):
            run.append(p)
            continue
        if any(q[0] == PAUSE for q in run):
            spans.append((run[0][1], run[-1][2]))
        run = [p] if p[0] in (PAUSE, WORD_BOUNDARY) else []
    return spans


def _without_short_pauses(phones: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The phones without the pauses of silences shorter than _SHORT_PAUSE_S between words (see there)."""
    words = [p for p in phones if p[0] not in (PAUSE, WORD_BOUNDARY)]
    if not words:
        return phones
    first, last = words[0][1], words[-1][2]
    short = [(s, e) for s, e in _pause_spans(phones) if e - s < _SHORT_PAUSE_S and s >= first and e <= last]
    if not short:
        return phones
    return [p for p in phones if not (p[0] == PAUSE and any(s - 1e-6 <= p[1] and p[2] <= e + 1e-6 for s, e in short))]


def _mouth_from_phonemes(phones: list[tuple[str, float, float]], t: np.ndarray,
                         fps: float, lead: float = _LIP_LEAD_S) -> tuple[np.ndarray, list[int]]:
    """(T, 4) open/round/spread/tuck by dominance blending plus closure and pause gates, and the sealed frames."""
    phones = _without_short_pauses(phones)
    spoken = [p for p in phones if p[0] != WORD_BOUNDARY]
    out = np.zeros((len(t), 4))
    if not spoken:
        return out, []
    syms = [p[0] for p in spoken]
    start = np.array([p[1] for p in spoken])
    end = np.array([p[2] for p in spoken])
    targets, dominance, kinds = table_arrays(syms)
    kinds_arr = np.array(kinds)
    centre = 0.5 * (start + end)
    half = 0.5 * (end - start)

    # Dominance shape: flat over the middle 60% of the phoneme, exponential decay outside,
    # with a longer tail before (anticipation) than after (carry-over). Banded: each phoneme
    # only touches frames within 8 decay constants of it (its weight beyond is < 4e-4).
    i0 = np.clip(np.floor((start - lead - 8 * _ANTICIPATION_S) * fps - 0.5).astype(np.int64), 0, len(t))
    i1 = np.clip(np.ceil((end + 8 * _CARRYOVER_S) * fps - 0.5).astype(np.int64) + 1, 0, len(t))
    counts = np.maximum(i1 - i0, 0)
    k_idx = np.repeat(np.arange(len(spoken)), counts)
    offsets = np.cumsum(counts) - counts
    f_idx = np.arange(counts.sum()) - np.repeat(offsets, counts) + np.repeat(i0, counts)

    def weights(shift: np.ndarray) -> np.ndarray:
        dt = t[f_idx] + shift[k_idx] - centre[k_idx]
        dist = np.maximum(np.abs(dt) - 0.6 * half[k_idx], 0.0)
        return np.exp(-dist / np.where(dt < 0, _ANTICIPATION_S, _CARRYOVER_S))

    # The opening leads its sound; silences keep their own timing, and so do the lip shapes
    # (round, spread, tuck), which carry no energy of their own to run ahead of.
    w_open = weights(np.where(kinds_arr == "pause", 0.0, lead))
    w_shape = weights(np.zeros(len(spoken)))
    rest = 1e-3  # a faint pull towards the closed rest shape far from any phoneme
    out = np.empty((len(t), 4))
    for j in range(4):
        w = w_open if j == 0 else w_shape
        num = np.bincount(f_idx, weights=w * dominance[k_idx, j] * targets[k_idx, j], minlength=len(t))
        den = np.bincount(f_idx, weights=w * dominance[k_idx, j], minlength=len(t)) + rest
        out[:, j] = num / den

    gate = np.ones(len(t))
    # Pauses (and the silence before the first / after the last phoneme): relax to closed.
    pauses = _pause_spans(phones)
    for s, e in [(-np.inf, spoken[0][1])] + pauses + [(spoken[-1][2], np.inf)]:
        a = max(0, int(np.floor(s * fps - 0.5))) if np.isfinite(s) else 0
        b = min(len(t), int(np.ceil(e * fps)) + 1) if np.isfinite(e) else len(t)
        if a >= b:
            continue
        tt = t[a:b]
        closing = _smoothstep((tt - s) / _PAUSE_RELAX_S) if np.isfinite(s) else 1.0
        opening = _smoothstep((e - tt) / _PAUSE_PREPARE_S) if np.isfinite(e) else 1.0
        gate[a:b] = np.minimum(gate[a:b], 1.0 - np.minimum(closing, opening))
    out *= gate[:, None]
    words = [p[1] for p in spoken if p[0] != PAUSE]
    out[:, 0] = np.maximum(out[:, 0], _breath(t, words[0] if words else None))

    # Bilabials: the lips are sealed over most of the phoneme (acoustically, the closure is the
    # phoneme), approach over _CLOSURE_RAMP_S before it and release faster after it. The frame
    # whose span contains the centre is closed exactly: that is the frame a viewer and a metric
    # look at, even when the phoneme is shorter than a frame. A /w/ closes its rounded lips to a
    # tenth of the opening around it the same way, approached earlier (lip rounding anticipates).
    closure = np.ones(len(t))
    for kind, floor, ramp, release in (("bilabial", 0.0, _CLOSURE_RAMP_S, _RELEASE_S),
                                       ("labial", _LABIAL_OPEN, _LABIAL_RAMP_S, _LABIAL_RELEASE_S)):
        for c, h in zip(centre[kinds_arr == kind], half[kinds_arr == kind]):
            a = max(0, int(np.floor((c - lead - h - ramp) * fps)))
            b = min(len(t), int(np.ceil((c + h + release) * fps)) + 1)
            tt = t[a:b]
            # The seal leads with the opening; the centre frame below is closed whatever the lead.
            before = (c - lead - 0.7 * h - tt) / ramp
            after = (tt - (c - lead + 0.7 * h)) / release
            gate = floor + (1.0 - floor) * _smoothstep(np.maximum(before, after))
            closure[a:b] = np.minimum(closure[a:b], gate)
            k = int(np.floor(c * fps))
            if kind == "bilabial" and 0 <= k < len(t):
                closure[k] = 0.0
    # Every frame the seals hold shut (not only the centres): the speed limit releases from the last.
    sealed = np.flatnonzero(closure == 0.0).tolist()
    out[:, 0] *= closure  # drive() then limits its speed, seals held
    out[:, 3] *= closure  # no tuck while the lips press together
    # Pressed lips spread less (and a spread seal parts at the seam): keep 40 % of the spread.
    out[:, 2] *= 0.4 + 0.6 * closure
    return out, sealed


def _breath(t: np.ndarray, onset: Optional[float]) -> np.ndarray:
    """The lips parted by _BREATH_OPEN over the _BREATH_LEAD_S before the first words, easing into the speech.

    Nothing when there are no words or the lead-in is shorter than _BREATH_MIN_LEAD_S.
    """
    if onset is None or onset < _BREATH_MIN_LEAD_S:
        return np.zeros(len(t))
    rise = _smoothstep((t - (onset - _BREATH_LEAD_S)) / 0.15)
    return _BREATH_OPEN * rise * (1.0 - _smoothstep((t - onset) / 0.1))


def _limit_speed(x: np.ndarray, step: float, sealed: Sequence[int] = ()) -> np.ndarray:
    """x changed by at most step per frame: raised where it moves faster, lowered only beside sealed frames.

    Openings start earlier (a backward pass: the jaw leaves in time to reach the vowel as it
    sounds) and closings end later (a forward pass), so every target is still reached on time.
    A sealed frame stays at 0 and the frames around it may be at most step per frame away from it:
    the lips close into a seal and part from it at the same top speed.
    """
    y = np.asarray(x, dtype=np.float64).copy()
    for i in range(len(y) - 2, -1, -1):
        y[i] = max(y[i], y[i + 1] - step)
    for i in range(1, len(y)):
        y[i] = max(y[i], y[i - 1] - step)
    if len(sealed):
        dist = np.full(len(y), np.inf)
        idx = np.arange(len(y))
        for k in sealed:
            np.minimum(dist, np.abs(idx - k), out=dist)
        y = np.minimum(y, dist * step)
    return y


def _stress_times(phones: list[tuple[str, float, float]], targets_open: np.ndarray, min_gap_s: float = 0.9) -> list[tuple[float, float]]:
    """(time, strength) of stressed-looking syllables: long, open vowels, greedily spaced."""
    cand = []
    for (sym, s, e), o in zip(phones, targets_open):
        if o >= 0.4 and e - s >= 0.06:
            cand.append(((s + e) / 2, (e - s) * o))
    cand.sort(key=lambda c: -c[1])
    if not cand:
        return []
    top = cand[0][1]
    chosen: list[tuple[float, float]] = []
    for tc, strength in cand:
        if all(abs(tc - x) >= min_gap_s for x, _ in chosen):
            chosen.append((tc, strength / top))
    return sorted(chosen)


# -- mouth from audio -------------------------------------------------------------------------
def _frame_windows(audio: np.ndarray, sr: int, t: np.ndarray, win_s: float) -> np.ndarray:
    """Mean square energy in a window centred on each time.

    Energy is first summed in 2.5 ms blocks (one cheap pass over the samples), then windows are
    cumulative sums of blocks: centres are exact to +-1.25 ms, far below a frame.
    """
    block = max(1, int(round(sr * 0.0025)))
    n_blocks = len(audio) // block
    sq = np.square(audio[: n_blocks * block], dtype=np.float32).reshape(n_blocks, block)
    energy = sq.sum(axis=1, dtype=np.float64)
    tail = np.square(audio[n_blocks * block:], dtype=np.float64).sum()
    energy = np.append(energy, tail)
    counts = np.full(len(energy), float(block))
    counts[-1] = max(len(audio) - n_blocks * block, 1)
    ce = np.concatenate([[0.0], np.cumsum(energy)])
    cn = np.concatenate([[0.0], np.cumsum(counts)])
    half = max(1, int(round(win_s * sr / block / 2)))
    c = np.round(t * sr / block).astype(np.int64)
    lo = np.clip(c - half, 0, len(energy))
    hi = np.clip(c + half, 0, len(energy))
    return (ce[hi] - ce[lo]) / np.maximum(cn[hi] - cn[lo], 1.0)


def audio_envelope(audio: np.ndarray, sr: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalised envelope in [0, 1], speech mask) at times t: 30 ms log-energy, percentile-normalised, noise gated."""
    ms = _frame_windows(audio, sr, t, 0.03)
    db = 10.0 * np.log10(ms + 1e-12)
    if db.size == 0:
        return db, db.astype(bool)
    peak = np.percentile(db, 95)
    if peak < -60.0:  # digital silence or near it: nothing to say
        return np.zeros_like(db), np.zeros(len(db), bool)
    gate = max(np.percentile(db, 10) + 6.0, peak - 35.0)
    env = np.clip((db - gate) / max(peak - gate, 1e-6), 0.0, 1.0)
    return env, db > gate


def _spectral_shape(audio: np.ndarray, sr: int, t: np.ndarray, voiced: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(round, spread) in [0, 1] from the F2-band vs low-band balance in voiced frames."""
    rnd = np.zeros(len(t))
    spr = np.zeros(len(t))
    if voiced.sum() < 3:
        return rnd, spr
    n_fft = int(2 ** np.ceil(np.log2(max(64, 0.04 * sr))))
    # Only voiced frames are analysed: that is where vowel shape is audible, and it is cheaper.
    sel = np.flatnonzero(voiced)
    a32 = np.asarray(audio, dtype=np.float32)
    if len(a32) < n_fft:
        a32 = np.pad(a32, (0, n_fft - len(a32)))
    # Windows centred on frame centres; the few at the very ends are clamped inside the audio.
    starts = np.clip(np.round(t[sel] * sr).astype(np.int64) - n_fft // 2, 0, len(a32) - n_fft)
    frames = np.lib.stride_tricks.sliding_window_view(a32, n_fft)[starts]
    spec = np.abs(sp_fft.rfft(frames * np.hanning(n_fft).astype(np.float32), axis=1)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    low = spec[:, (freqs >= 300) & (freqs < 1000)].sum(axis=1) + 1e-12
    f2 = spec[:, (freqs >= 1700) & (freqs < min(3000, sr / 2))].sum(axis=1) + 1e-12
    ratio = np.log(f2 / low)
    z = (ratio - np.median(ratio)) / max(np.percentile(ratio, 90) - np.percentile(ratio, 10), 1e-6)
    spr[sel] = np.clip(1.5 * z, 0, 1) * 0.6
    rnd[sel] = np.clip(-1.5 * z, 0, 1) * 0.6
    return rnd, spr


def _band_level(audio: np.ndarray, sr: int, t: np.ndarray, lo_hz: float, hi_hz: float) -> np.ndarray:
    """Log energy (dB) of the lo-hi band in 30 ms windows centred on times t."""
    nyq = 0.5 * sr
    if lo_hz >= 0.95 * nyq:
        return np.full(len(t), -120.0)
    sos = signal.butter(2, [lo_hz / nyq, min(hi_hz, 0.95 * nyq) / nyq], btype="band", output="sos")
    band = signal.sosfilt(sos, audio).astype(np.float32)
    return 10.0 * np.log10(_frame_windows(band, sr, t, 0.03) + 1e-12)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends (exclusive) of the True runs of a boolean array."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def _speech_runs(speech: np.ndarray, fps: float, min_on_s: float = 0.1, min_gap_s: float = 0.15) -> np.ndarray:
    """The speech mask without blips shorter than min_on_s (noise) and gaps shorter than min_gap_s (stop closures)."""
    out = speech.copy()
    for a, b in zip(*_runs(out)):
        if b - a < min_on_s * fps:
            out[a:b] = False
    for a, b in zip(*_runs(~out)):
        if 0 < a and b < len(out) and b - a < min_gap_s * fps:
            out[a:b] = True
    return out


def speech_mask(audio: np.ndarray, sample_rate: int, n_frames: int, fps: float) -> Optional[np.ndarray]:
    """Which of n_frames (at fps, from the audio's start) hear speech, as the audio-only driving finds it;
    None when the audio is silent throughout (nothing says when anyone speaks)."""
    wav, sr = _mono(audio, sample_rate)
    t = (np.arange(n_frames) + 0.5) / fps
    _, speech = audio_envelope(wav, sr, t)
    if not speech.any():
        return None
    return _speech_runs(speech, fps)


def _mouth_from_audio(audio: np.ndarray, sr: int, t: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(T, 4) mouth from audio alone (speech units), and the normalised envelope used for it.

    The opening mixes two cues: loudness (syllable nuclei are loud, consonants weaker) and the
    level of the 1.5-3 kHz band, where open, unrounded lips radiate the most (rounding and a
    small aperture lower F2 and F3: /w/, /u/, /r/). Rounding, read from the spectrum's balance,
    closes the opening further, as rounded lips do. Blips of noise and the brief silences of stop
    closures are not speech; before the first words the lips part for a breath, as with phoneme timings.
    """
    env, speech = audio_envelope(audio, sr, t)
    out = np.zeros((len(t), 4))
    if not speech.any():
        return out, env
    speech = _speech_runs(speech, fps)
    lips_db = _band_level(audio, sr, t, 1500.0, 3000.0)
    peak = np.percentile(lips_db, 95)
    floor = max(np.percentile(lips_db, 10) + 6.0, peak - 35.0)
    lips = np.clip((lips_db - floor) / max(peak - floor, 1e-6), 0.0, 1.0)
    opening = _zero_phase_lowpass(0.4 * env + 0.6 * lips, fps, 6.0)
    rnd, spr = _spectral_shape(audio, sr, t, env > 0.25)
    rnd = _zero_phase_lowpass(rnd, fps, 4.0).clip(0, 1)
    gate = np.clip(_zero_phase_lowpass(speech.astype(float), fps, 5.0), 0.0, 1.0)
    mouth = np.clip(opening, 0.0, 1.0) * (1.0 - 1.25 * rnd).clip(0.0, 1.0) * gate
    mouth[mouth < 0.02] = 0.0
    first = np.flatnonzero(speech)
    out[:, 0] = np.maximum(mouth, _breath(t, float(t[first[0]]) if first.size else None))
    out[:, 1] = rnd * gate
    out[:, 2] = _zero_phase_lowpass(spr, fps, 4.0).clip(0, 1) * gate
    return out, env


# -- eyes and head ----------------------------------------------------------------------------
def motion_rng(seed: int, avatar_key: str = "") -> np.random.Generator:
    """The generator of a clip's blinks and head drift, from the request's seed and the avatar.

    Seeded by both, so two portraits driven with the same seed (the default 0) do not blink on the
    same frames, and one portrait blinks elsewhere for another seed. The key is hashed with SHA-256,
    which, unlike hash(), is the same in every process.
    """
    key = int.from_bytes(hashlib.sha256(avatar_key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed) % (1 << 63), key])


class _BlinkSchedule:
    """Blink events (peak, close, hold, open seconds) every ~4 s (10-20 per minute), irregular, drawn as time advances."""

    def __init__(self, rng: np.random.Generator, fps: float) -> None:
        self._rng = rng
        self._fps = fps
        self._peak = 0.5 + rng.uniform(0.4, 3.5)
        self.events: list[tuple[float, float, float, float]] = []
        self._peaks: list[float] = []

    def extend(self, until_s: float) -> None:
        """Draw the blinks whose peaks fall before `until_s`."""
        rng = self._rng
        while self._peak < until_s:
            # A real blink (v03, the kit's GRID talker who blinks twice in full, MediaPipe's lid opening per
            # 40 ms frame): closed past 0.4 in one frame, held at 0.68-0.94 for three, opened over four with a
            # tail (0.32, 0.15, 0.07 ...): 0.28-0.32 s from first movement to within 5 % of open. Ours closed
            # in 50 ms and opened in 80: shut for a single frame, a flicker rather than a blink.
            close_s = rng.uniform(0.06, 0.09)
            hold_s = rng.uniform(0.03, 0.07)
            open_s = rng.uniform(0.15, 0.21)
            # Snap the fully-closed instant to a frame centre so a rendered frame shows it closed.
            pk = (np.floor(self._peak * self._fps) + 0.5) / self._fps
            if pk - close_s >= 0.5:
                self.events.append((pk, close_s, hold_s, open_s))
                self._peaks.append(pk)
            self._peak += float(np.clip(rng.gamma(8.0, 4.2 / 8.0), 2.0, 8.0))

    def curve(self, t: np.ndarray) -> np.ndarray:
        """Lid closure at times t: each blink closes in 60-90 ms, stays shut 30-70 ms and opens in 150-210 ms."""
        out = np.zeros(len(t))
        if not len(t):
            return out
        lo, hi = float(np.min(t)), float(np.max(t))
        # Events are in time order and no blink lasts 0.5 s: only those peaking within 0.5 s of t can touch it.
        first = bisect.bisect_left(self._peaks, lo - 0.5)
        last = bisect.bisect_right(self._peaks, hi + 0.5)
        for pk, close_s, hold_s, open_s in self.events[first:last]:
            if pk - close_s > hi or pk + hold_s + open_s < lo:
                continue  # it is 0 at every t: a long stream's block looks only at the blinks around it
            down = _smoothstep((t - (pk - close_s)) / close_s)
            up = 1.0 - _smoothstep((t - (pk + hold_s)) / open_s)
            out = np.maximum(out, np.where(t <= pk, down, np.where(t <= pk + hold_s, 1.0, up)))
        return out


def _blinks(t: np.ndarray, fps: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Blinks over a clip of duration_s, sampled at t."""
    schedule = _BlinkSchedule(rng, fps)
    schedule.extend(duration_s)
    return schedule.curve(t)


GAZE_AVERT = (0.035, 0.075)
"""Sideways iris shift of a look away, in eye widths (about 5-11 degrees of eye turn)."""
GAZE_JITTER = 0.008
"""Spread of the small shifts between fixations on the listener (about 1 degree), in eye widths."""


def _gaze_rng(seed: int, avatar_key: str) -> np.random.Generator:
    """The gaze's own generator (motion_rng of a derived key), so gaze leaves the blinks and head drift as drawn."""
    return motion_rng(seed, avatar_key + "\x00gaze")


class _GazeSchedule:
    """Fixations (start, x, y in eye widths) drawn as time advances: a speaker looks at the listener (the camera)
    with small shifts of about a degree every 0.4-3 s, and now and then looks away sideways or down for 0.3-1.5 s.

    The first fixation is on the camera for 0.8-2.5 s, so a clip starts as the portrait looks. Each person
    looks away more to one side (a side drawn once per avatar and seed, taken 70 % of the time). The
    eyes jump between fixations in a saccade (30-50 ms, faster than a frame at 25 fps; see curve).
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._side = float(rng.choice((-1.0, 1.0)))
        self._next = float(rng.uniform(0.8, 2.5))
        self._away = False
        self.fixations: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)]
        self._array: Optional[np.ndarray] = None

    def extend(self, until_s: float) -> None:
        """Draw the fixations that start before `until_s`."""
        rng = self._rng
        while self._next < until_s:
            if not self._away and rng.uniform() < 0.35:
                side = self._side if rng.uniform() < 0.7 else -self._side
                x = side * rng.uniform(*GAZE_AVERT)
                y = rng.uniform(-0.01, 0.03)  # down more often than up, as when thinking of the next words
                hold = float(np.clip(rng.gamma(4.0, 0.8 / 4.0), 0.3, 1.5))
                self._away = True
            else:
                x, y = rng.normal(0.0, GAZE_JITTER), rng.normal(0.0, 0.6 * GAZE_JITTER)
                hold = float(np.clip(rng.gamma(3.0, 1.3 / 3.0), 0.4, 3.0))
                self._away = False
            self.fixations.append((self._next, float(x), float(y)))
            self._next += hold

    def curve(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) at times t: each fixation held, reached from the last by a saccade of 30-50 ms (smoothstep)."""
        if self._array is None or len(self._array) != len(self.fixations):
            self._array = np.asarray(self.fixations, np.float64)  # made again only after extend drew more
        fix = self._array
        t = np.asarray(t, np.float64)
        # Each t is on the way from the fixation before the last one started to that last one (fixations
        # last 0.3 s or more, saccades 50 ms at most): the same value however a stream is cut into blocks.
        k = np.clip(np.searchsorted(fix[:, 0], t, side="right") - 1, 0, len(fix) - 1)
        prev = fix[np.maximum(k - 1, 0)]
        cur = fix[k]
        size = np.hypot(cur[:, 1] - prev[:, 1], cur[:, 2] - prev[:, 2]) / 0.007  # degrees, ~0.007 eye widths each
        ramp = np.where(k > 0, _smoothstep((t - cur[:, 0]) / (0.021 + 0.0022 * size)), 1.0)  # 21 ms + 2.2 ms/degree
        return prev[:, 1] + (cur[:, 1] - prev[:, 1]) * ramp, prev[:, 2] + (cur[:, 2] - prev[:, 2]) * ramp

    def hold(self, t0: float, t1: float, x: float, y: float) -> None:
        """Look at (x, y) from t0 to t1 instead of what was drawn there; what was drawn for t1 resumes then."""
        self.extend(t1 + 0.1)  # every drawn fixation that starts inside is replaced, whenever it would be drawn
        self.fixations = _override(self.fixations, t0, t1, x, y)
        self._array = None


def _override(fix: list[tuple[float, float, float]], t0: float, t1: float, x: float,
              y: float) -> list[tuple[float, float, float]]:
    """Fixations with (x, y) from t0 to t1 in place of those starting inside, and t1's own fixation resuming at t1."""
    starts = [f[0] for f in fix]
    held = fix[max(bisect.bisect_right(starts, t1) - 1, 0)]  # what was drawn for t1
    out = [f for f in fix if not (t0 <= f[0] <= t1)] + [(t0, x, y), (t1, held[1], held[2])]
    out.sort(key=lambda f: f[0])
    return out


GAZE_RETURN_S = 0.5
"""A speaker looks back at the listener this long before a phrase ends (and holds it into the pause)."""
GAZE_PLAN_P = 0.5
"""Chance that a phrase after a pause starts with a look away (planning what to say)."""


def _phrases(talking: np.ndarray, fps: float, min_pause_s: float = 0.3) -> list[tuple[float, float]]:
    """(start, end) seconds of the runs of speech in a per-frame mask, joined across pauses shorter than min_pause_s."""
    starts, ends = _runs(talking)
    out: list[tuple[float, float]] = []
    for a, b in zip(starts / fps, ends / fps):
        if out and a - out[-1][1] < min_pause_s:
            out[-1] = (out[-1][0], float(b))
        else:
            out.append((float(a), float(b)))
    return [(a, b) for a, b in out if b - a >= min_pause_s]


def _speech_gaze(fixations: list[tuple[float, float, float]], phrases: Sequence[tuple[float, float]],
                 rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """The idle fixations with speech's pattern laid over them (Kendon 1967; Argyle & Cook 1976).

    A speaker looks away as a phrase begins after a pause, while planning it (GAZE_PLAN_P of the
    phrases of 1.5 s or more, just before the first sound, for 0.4-1.2 s), and looks back at the
    listener over the last GAZE_RETURN_S of every phrase, into the pause after it: no look away
    lasts through a phrase's end. A clip's start stays as drawn (on the camera).
    """
    overrides: list[tuple[float, float, float, float]] = []  # (from, to, x, y)
    for i, (a, b) in enumerate(phrases):
        after_pause = i > 0 or a >= 0.8
        if after_pause and b - a >= 1.5 and rng.uniform() < GAZE_PLAN_P:
            side = 1.0 if rng.uniform() < 0.5 else -1.0
            hold = min(float(rng.uniform(0.4, 1.2)), b - a - GAZE_RETURN_S - 0.3)
            overrides.append((max(a - 0.15, 0.0), a - 0.15 + hold, side * float(rng.uniform(*GAZE_AVERT)),
                              float(rng.uniform(-0.01, 0.03))))
        nxt = phrases[i + 1][0] if i + 1 < len(phrases) else np.inf
        x, y = rng.normal(0.0, GAZE_JITTER), rng.normal(0.0, 0.6 * GAZE_JITTER)
        overrides.append((max(b - GAZE_RETURN_S, a), min(b + 0.3, nxt - 0.15), float(x), float(y)))
    fix = list(fixations)
    for t0, t1, x, y in overrides:
        if t1 > t0 > 0.0:
            fix = _override(fix, t0, t1, x, y)
    return fix


def _gaze(t: np.ndarray, duration_s: float, seed: int, avatar_key: str,
          phrases: Sequence[tuple[float, float]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Gaze over a clip of duration_s, sampled at t; with speech's phrases, tied to them (_speech_gaze)."""
    rng = _gaze_rng(seed, avatar_key)
    schedule = _GazeSchedule(rng)
    schedule.extend(duration_s)
    if phrases:
        schedule.fixations = _speech_gaze(schedule.fixations, phrases, rng)
    return schedule.curve(t)


def _drift_wave(amplitude: float, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """Slow band-limited drift: three sines of 0.05-0.3 Hz, zero at t=0, peak |x| ~ amplitude.

    Scaled by its peak over a fixed 20 s reference, so the amplitude does not depend on the
    clip's length (a short clip is not exaggerated).
    """
    freqs = rng.uniform(0.05, 0.3, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    weights = rng.dirichlet(np.ones(3))

    def wave(tt: np.ndarray) -> np.ndarray:
        return sum(wt * (np.sin(2 * np.pi * f * tt + p) - np.sin(p)) for f, p, wt in zip(freqs, phases, weights))

    ref = np.abs(wave(np.linspace(0.0, 20.0, 401))).max()
    return lambda tt: amplitude * wave(tt) / max(ref, 1e-9)


def _drift(t: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """The drift of _drift_wave sampled at t."""
    return _drift_wave(amplitude, rng)(t)


HEAD_DRIFT = {"head_dx": 0.015, "head_dy": 0.008, "head_yaw": 0.02, "head_pitch": 0.01, "head_roll": 0.012}
"""Peak amplitude of each head control's idle drift (fractions of the face, radians)."""


STREAM_PHRASE_GAP_S = 0.2
"""A stream's mouth closed this long ends a phrase (stop closures inside words are shorter: _SHORT_PAUSE_S)."""
_STREAM_TALKING = 0.05 * SPEECH_OPEN
"""A stream's mouth open past this (mouth_open) is speaking: vowels and most consonants are; a seal or a mouth at rest
is not."""


class IdleMotion:
    """Blinks, gaze shifts and slow head drift for an open-ended stream of frames (no clip length known in advance).

    Frame k gets the same values however the frames are split into blocks: the drift is a fixed
    function of time and blinks are drawn in order as time advances. The gaze follows the stream's
    speech as a clip's does (_speech_gaze), as far as a stream can know it, frame by frame from the
    mouth it is given: a phrase that starts after a pause of STREAM_PHRASE_GAP_S or more starts with
    a look away GAZE_PLAN_P of the time, and STREAM_PHRASE_GAP_S after a phrase's last opening the
    eyes are back on the listener for the pause (a clip, which knows where its phrases end, looks
    back GAZE_RETURN_S before).
    """

    def __init__(self, fps: float, seed: int = 0, head_motion: bool = True, avatar_key: str = "") -> None:
        rng = motion_rng(seed, avatar_key)
        self.fps = float(fps)
        self._waves = {name: _drift_wave(amp, rng) for name, amp in HEAD_DRIFT.items()} if head_motion else {}
        self._blinks = _BlinkSchedule(rng, self.fps)
        self._gaze = _GazeSchedule(_gaze_rng(seed, avatar_key))
        self._phrase_rng = _gaze_rng(seed, avatar_key + "\x00phrases")
        self._talking = False
        self._quiet_s = np.inf  # since the mouth last spoke

    def _follow_speech(self, mouth_open: np.ndarray, t: np.ndarray) -> None:
        """Lay speech's gaze pattern over the drawn fixations as phrases start and end, frame by frame."""
        rng, dt = self._phrase_rng, 1.0 / self.fps
        for ti, mo in zip(t.tolist(), mouth_open.tolist()):
            if mo > _STREAM_TALKING:
                if not self._talking and self._quiet_s >= STREAM_PHRASE_GAP_S:
                    self._talking = True
                    if ti >= 0.8 and rng.uniform() < GAZE_PLAN_P:  # a stream's start stays on the camera
                        side = 1.0 if rng.uniform() < 0.5 else -1.0
                        self._gaze.hold(ti, ti + float(rng.uniform(0.4, 1.2)), side * float(rng.uniform(*GAZE_AVERT)),
                                        float(rng.uniform(-0.01, 0.03)))
                self._quiet_s = 0.0
                continue
            self._quiet_s += dt
            if self._talking and self._quiet_s >= STREAM_PHRASE_GAP_S:
                self._talking = False
                self._gaze.hold(ti, ti + float(rng.uniform(0.3, 0.8)), float(rng.normal(0.0, GAZE_JITTER)),
                                float(rng.normal(0.0, 0.6 * GAZE_JITTER)))

    def apply(self, controls: Controls, start_frame: int) -> Controls:
        """The controls of frames [start_frame, start_frame + n) with blinks, gaze and head drift added."""
        t = (np.arange(start_frame, start_frame + controls.n_frames) + 0.5) / self.fps
        self._blinks.extend(float(t[-1]) + 1.0 if len(t) else 0.0)
        out = controls.slice(0, controls.n_frames)
        out.blink = np.maximum(out.blink, self._blinks.curve(t)).astype(np.float32)
        self._gaze.extend(float(t[-1]) + 1.0 if len(t) else 0.0)
        self._follow_speech(controls.mouth_open, t)
        gx, gy = self._gaze.curve(t)
        out.gaze_x = (out.gaze_x + gx).astype(np.float32)
        out.gaze_y = (out.gaze_y + gy).astype(np.float32)
        for name, wave in self._waves.items():
            setattr(out, name, (getattr(out, name) + wave(t)).astype(np.float32))
        return out


def _bumps(t: np.ndarray, events: Sequence[tuple[float, float]], width_s: float = 0.5) -> np.ndarray:
    """A raised-cosine bump of width_s per (time, signed strength) event, peaking just after it."""
    out = np.zeros(len(t))
    for tc, strength in events:
        x = (t - (tc + 0.05)) / (width_s / 2)
        out += strength * np.where(np.abs(x) < 1, 0.5 * (1 + np.cos(np.pi * x)), 0.0)
    return out


NOD_PITCH = 0.012
"""Head dip (radians) on the strongest stressed syllable; weaker stresses nod less."""
TILT_ROLL = 0.006
"""Head tilt (radians) on stressed syllables, to one side or the other."""


def _head(ctl: Controls, t: np.ndarray, stress: Sequence[tuple[float, float]], activity: np.ndarray,
          rng: np.random.Generator) -> None:
    """Head pose: slow drift, livelier while speaking, with a nod and a small tilt on each stressed syllable.

    Speakers' heads move with their speech: more during phrases than in silence, and with a dip of
    the head on stressed syllables, often with a tilt. Every part is smooth (drift below 0.3 Hz,
    activity below 1 Hz, half-second bumps), so there is no jitter.
    """
    drift = {name: _drift(t, amp, rng) for name, amp in HEAD_DRIFT.items()}  # drawn in HEAD_DRIFT's order
    lively = 0.75 + 0.5 * activity
    nod = _bumps(t, stress)
    tilt = _bumps(t, [(tc, s * rng.choice((-1.0, 1.0))) for tc, s in stress])
    ctl.head_dx[:] = drift["head_dx"] * lively
    ctl.head_dy[:] = drift["head_dy"] + 0.004 * nod
    ctl.head_yaw[:] = drift["head_yaw"] * lively
    ctl.head_pitch[:] = drift["head_pitch"] + NOD_PITCH * nod
    ctl.head_roll[:] = drift["head_roll"] * lively + TILT_ROLL * tilt


def _activity(opening: np.ndarray, fps: float) -> np.ndarray:
    """How much is being said around each frame, 0 (silence) .. 1: the mouth's opening below 1 Hz, over its p95."""
    slow = _zero_phase_lowpass(opening, fps, 1.0)
    top = np.percentile(slow, 95) if len(slow) else 0.0
    return np.clip(slow / top, 0.0, 1.0) if top > 1e-6 else np.zeros(len(opening))


def drive(
    duration_s: float,
    fps: float,
    *,
    phonemes: Optional[Iterable] = None,
    audio: Optional[np.ndarray] = None,
    sample_rate: Optional[int] = None,
    emotion: str = "neutral",
    text: Optional[str] = None,
    seed: int = 0,
    head_motion: bool = True,
    avatar_key: str = "",
    lip_lead_s: float = _LIP_LEAD_S,
    amplitude: float = 1.0,
) -> Controls:
    """Per-frame face controls for speech given as phoneme timings, audio, or both.

    `seed` and `avatar_key` (the avatar's id) draw the blinks, the gaze's fixations and the head's drift (motion_rng).
    `lip_lead_s` is how far the mouth runs ahead of the phoneme timings: lip_lead(the timings' source).
    `amplitude` scales the opening for a speaker who opens wider (> 1) or less than the population's
    SPEECH_OPEN (lip-sync reads it off the filmed person: lipsync/speaker.py); the jaw's speed cap still holds.
    """
    t0 = time.perf_counter()
    if not (np.isfinite(duration_s) and duration_s > 0):
        raise ValidationFailed(f"duration_s must be > 0, got {duration_s!r}")
    if not (np.isfinite(fps) and 1 <= fps <= 120):
        raise ValidationFailed(f"fps must be within [1, 120], got {fps!r}")
    emo = resolve_emotion(emotion, text)
    n = int(round(duration_s * fps))
    ctl = Controls.neutral(n, float(fps))
    if n == 0:
        return ctl
    t = (np.arange(n) + 0.5) / fps
    rng = motion_rng(seed, avatar_key)
    smile, brow, eye_open, scale = EMOTIONS[emo]

    phones = _split_glides(_phone_tuples(phonemes)) if phonemes is not None else []
    has_phones = any(p[0] not in (PAUSE, WORD_BOUNDARY) for p in phones)
    wav = None
    if audio is not None:
        wav, sr = _mono(audio, sample_rate)

    env = None
    talking = np.zeros(n, bool)
    if has_phones:
        mouth, sealed = _mouth_from_phonemes(phones, t, fps, lip_lead_s)
        spans = np.array([(s, e) for sym, s, e in phones if sym not in (PAUSE, WORD_BOUNDARY)])
        inside = np.searchsorted(spans[:, 0], t, side="right") - 1  # the last spoken phone starting before t
        talking = (inside >= 0) & (t < spans[np.maximum(inside, 0), 1])
        spoken = [p for p in phones if p[0] not in (PAUSE, WORD_BOUNDARY)]
        targets, _, _ = table_arrays([p[0] for p in spoken])
        stress = _stress_times(spoken, targets[:, 0])
        if wav is not None:
            env, speech = audio_envelope(wav, sr, t)
            # Audio modulates loudness of articulation only; the phonemes keep the shape and closures.
            level = _zero_phase_lowpass(env, fps, 4.0)
            mouth[:, 0] *= np.clip(0.8 + 0.35 * level, 0.75, 1.15)
        mode = "phonemes+audio" if wav is not None else "phonemes"
    elif wav is not None:
        mouth, env = _mouth_from_audio(wav, sr, t, fps)
        sealed = []
        talking = _speech_runs(audio_envelope(wav, sr, t)[1], fps)
        smooth = _zero_phase_lowpass(env, fps, 3.0)
        peaks, props = signal.find_peaks(smooth, distance=max(1, int(0.9 * fps)), prominence=0.15)
        top = props["prominences"].max() if len(peaks) else 1.0
        stress = [(t[p], pr / top) for p, pr in zip(peaks, props["prominences"])]
        mode = "audio"
    else:
        mouth = np.zeros((n, 4))
        stress, sealed = [], []
        mode = "idle"

    if not (np.isfinite(amplitude) and 0.0 < amplitude <= 2.0):
        raise ValidationFailed(f"amplitude must be within (0, 2], got {amplitude!r}")
    opening = _limit_speed(np.clip(mouth[:, 0] * (scale * amplitude), 0.0, amplitude), _JAW_SPEED / fps, sealed)
    ctl.mouth_open[:] = opening * SPEECH_OPEN
    ctl.mouth_round[:] = np.clip(mouth[:, 1], 0.0, 1.0)
    ctl.mouth_spread[:] = np.clip(mouth[:, 2], 0.0, 1.0)
    ctl.lip_tuck[:] = np.clip(mouth[:, 3], 0.0, 1.0)

    ctl.smile[:] = smile
    # Brows lift a little on stressed syllables: speakers emphasise with them.
    ctl.brow[:] = np.clip(brow + 0.12 * _bumps(t, stress), -1.0, 1.0)
    ctl.eye_open[:] = eye_open
    ctl.blink[:] = _blinks(t, fps, n / fps, rng)
    ctl.gaze_x[:], ctl.gaze_y[:] = _gaze(t, n / fps, seed, avatar_key, _phrases(talking, fps))
    if head_motion:
        _head(ctl, t, stress, _activity(opening, fps), rng)

    log.debug(
        "driven",
        extra={"mode": mode, "frames": n, "fps": fps, "emotion": emo, "nods": len(stress),
               "ms": round(1000 * (time.perf_counter() - t0), 2)},
    )
    return ctl
