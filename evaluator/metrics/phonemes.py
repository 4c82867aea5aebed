"""Agreement of the measured mouth with phoneme timings: bilabials closed, vowels open, pauses closed.

Input is the per-frame inner-lip gap divided by the face height (FaceTrack.mouth_gap) and
phoneme spans (anything with .phoneme/.start_s/.end_s, or (phoneme, start_s, end_s) tuples;
IPA as Piper writes it, " " a word boundary, "_" a pause). A phoneme is judged at its centre
frame, the frame whose span [i/fps, (i+1)/fps) contains the phoneme's midpoint.

Thresholds, in units of face height (10<->152, about 100 px on a 512 px portrait):
- closed: gap <= CLOSED_GAP (0.02, ~2 px on a 100 px face). Absolute on purpose: sealed lips
  are a physical fact, and a portrait whose rest mouth is open (astronaut: ~0.065) must really
  be closed by the renderer to score; its rest state earns nothing.
- open: gap - rest >= max(OPEN_MIN_RISE, OPEN_REL * (p95 - rest)), where rest is the 5th
  percentile of the clip's gap. Relative to the clip's own closed state, so a mouth that is
  merely open at rest and never moves scores no open vowels, and a mouth that never fully
  closes still gets credit for opening further on vowels.
- pauses: frames inside a silence (a run of "_" and " " with at least one "_") after the
  first PAUSE_SETTLE_S and before the last PAUSE_PREPARE_S, where the mouth may still be
  relaxing or preparing the next word; they count as closed under the closed threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

CLOSED_GAP = 0.02
OPEN_MIN_RISE = 0.03
OPEN_REL = 0.35
PAUSE_SETTLE_S = 0.12
PAUSE_PREPARE_S = 0.08

_MODIFIERS = "ːˑˈˌ̩̃ʲʰ̯"
BILABIALS = frozenset("mbp")
VOWELS = frozenset("aɑæʌɔɒɐɛeəɜɝɚoɵøœɪiᵻɨyʊuʉɯ")


@dataclass
class PhonemeAgreement:
    """Shares in [0, 1] (NaN when there was nothing to judge) and the thresholds used."""

    bilabial_closed: float
    n_bilabial: int
    vowel_open: float
    n_vowel: int
    pause_closed: float
    n_pause_frames: int
    closed_gap: float
    open_gap: float
    rest_gap: float


def _spans(phonemes: Iterable) -> list[tuple[str, float, float]]:
    out = []
    for p in phonemes:
        if hasattr(p, "phoneme"):
            out.append((p.phoneme, float(p.start_s), float(p.end_s)))
        else:
            sym, s, e = p
            out.append((str(sym), float(s), float(e)))
    return out


def _base(sym: str) -> str:
    return "".join(ch for ch in sym if ch not in _MODIFIERS)


def silences(phonemes: Iterable) -> list[tuple[float, float]]:
    """Spans of adjacent "_"/" " runs that contain a pause."""
    out, run = [], []
    for p in _spans(phonemes) + [None]:
        if p is not None and p[0] in ("_", " ") and (not run or abs(p[1] - run[-1][2]) < 1e-3):
            run.append(p)
            continue
        if any(q[0] == "_" for q in run):
            out.append((run[0][1], run[-1][2]))
        run = [p] if p is not None and p[0] in ("_", " ") else []
    return out


def phoneme_agreement(phonemes: Iterable, mouth_gap: np.ndarray, fps: float) -> PhonemeAgreement:
    """Score a measured mouth-gap series against phoneme timings (see the module docstring)."""
    gap = np.asarray(mouth_gap, dtype=np.float64)
    spans = _spans(phonemes)
    valid = gap[np.isfinite(gap)]
    rest = float(np.percentile(valid, 5)) if valid.size else np.nan
    p95 = float(np.percentile(valid, 95)) if valid.size else np.nan
    open_gap = rest + max(OPEN_MIN_RISE, OPEN_REL * (p95 - rest))

    def at(t: float) -> float:
        k = int(np.floor(t * fps))
        return gap[k] if 0 <= k < len(gap) else np.nan

    bil = [at(0.5 * (s + e)) for sym, s, e in spans if _base(sym) in BILABIALS]
    vow = [at(0.5 * (s + e)) for sym, s, e in spans if _base(sym)[:1] in VOWELS]
    bil = np.array([g for g in bil if np.isfinite(g)])
    vow = np.array([g for g in vow if np.isfinite(g)])

    t = (np.arange(len(gap)) + 0.5) / fps
    quiet = np.zeros(len(gap), bool)
    for s, e in silences(spans):
        quiet |= (t >= s + PAUSE_SETTLE_S) & (t <= e - PAUSE_PREPARE_S)
    quiet &= np.isfinite(gap)

    def share(mask: np.ndarray) -> float:
        return float(mask.mean()) if mask.size else float("nan")

    return PhonemeAgreement(
        bilabial_closed=share(bil <= CLOSED_GAP),
        n_bilabial=int(bil.size),
        vowel_open=share(vow >= open_gap),
        n_vowel=int(vow.size),
        pause_closed=share(gap[quiet] <= CLOSED_GAP),
        n_pause_frames=int(quiet.sum()),
        closed_gap=CLOSED_GAP,
        open_gap=float(open_gap),
        rest_gap=rest,
    )
