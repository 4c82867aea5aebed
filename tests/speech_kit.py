"""The media kit's speech clips and their reference timings, and how derived timings are scored against them.

A clip is `<name>.wav` with `<name>.txt` (transcript) and `<name>.align.json` (pocketsphinx word and
phone timings: `t` label, `b` start, `d` duration, in seconds, phones nested in words). Used by the
alignment tests and benchmarks/bench_alignment.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from runtime.captions import spoken_words

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "media"
PROXY_BILABIAL_S = 0.06
"""Span given to a word-initial m/b/p of a clip that has word timings only (its phones unknown)."""


@dataclass
class KitClip:
    """One speech clip of the kit with its reference timings."""

    name: str
    audio: np.ndarray
    """Mono float32."""
    sample_rate: int
    text: str
    words: list[tuple[str, float, float]]
    """(word, start_s, end_s), silences left out, alternate-pronunciation marks "(2)" stripped."""
    phones: list[tuple[str, float, float]]
    """(ARPAbet, start_s, end_s) including SIL; empty when the kit has word timings only (a01)."""

    @property
    def duration_s(self) -> float:
        """Length of the audio."""
        return len(self.audio) / float(self.sample_rate)

    def bilabials(self) -> list[tuple[str, float, float]]:
        """Reference m/b/p spans; for a clip without phone timings, its word-initial ones with a proxy span."""
        if self.phones:
            return [p for p in self.phones if p[0] in ("M", "B", "P")]
        return [(w[0].upper(), s, s + PROXY_BILABIAL_S) for w, s, _ in self.words if w[0] in "mbp"]


def load_clip(wav: Path) -> KitClip:
    """A kit clip from its WAV path (the .txt and .align.json beside it)."""
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    ref = json.loads(wav.with_suffix(".align.json").read_text())
    words, phones = [], []
    for w in ref["w"]:
        if not w["t"].startswith(("<", "[")):
            words.append((re.sub(r"\(\d+\)$", "", w["t"]), w["b"], w["b"] + w["d"]))
        phones += [(p["t"], p["b"], p["b"] + p["d"]) for p in w.get("w", [])]
    return KitClip(wav.stem, audio.mean(axis=1), int(rate), wav.with_suffix(".txt").read_text().strip(), words, phones)


def word_starts(phonemes: Sequence) -> list[float]:
    """Start of each spoken word of IPA phoneme timings (words split at " " and "_")."""
    spans = spoken_words({"phoneme": p.phoneme, "start_s": p.start_s, "end_s": p.end_s} for p in phonemes)
    return [s for s, _ in spans]


def bilabial_onsets(phonemes: Sequence) -> list[float]:
    """Start of every m/b/p of IPA phoneme timings."""
    return [p.start_s for p in phonemes if p.phoneme in ("m", "b", "p")]


def nearest_errors(reference: Sequence[float], found: Sequence[float]) -> np.ndarray:
    """For each reference time, the distance in seconds to the nearest found one (inf when none was found)."""
    hyp = np.asarray(found, dtype=np.float64)
    return np.array([np.abs(hyp - r).min() if hyp.size else np.inf for r in reference])
