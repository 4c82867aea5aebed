"""Viseme table: IPA phonemes (as Piper/espeak writes them) to mouth-shape targets and dominances.

Each phoneme maps to targets for (mouth_open, mouth_round, mouth_spread, lip_tuck) and to a
dominance per target: how strongly the phoneme holds that parameter against its neighbours
during coarticulation (Cohen-Massaro). A vowel dominates the jaw; a /h/ barely dominates anything
and borrows the shape of the vowel after it; a /w/ dominates rounding, so rounding spreads into
the consonants around it, as it does in real speech.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAUSE = "_"
WORD_BOUNDARY = " "
BILABIALS = frozenset({"m", "b", "p"})
LABIODENTALS = frozenset({"f", "v"})

# Symbols that modify the phoneme before them (length, stress, syllabicity, nasalisation...).
_MODIFIERS = "ːˑˈˌ̩̃ʲʰ̯"

PARAMS = ("mouth_open", "mouth_round", "mouth_spread", "lip_tuck")


@dataclass(frozen=True)
class Viseme:
    """Mouth-shape targets of one phoneme and how strongly it holds each of them."""

    targets: tuple[float, float, float, float]
    """(mouth_open, mouth_round, mouth_spread, lip_tuck), each in [0, 1]; mouth_open in speech units (see _TABLE)."""
    dominance: tuple[float, float, float, float]
    """Blending weight per target; larger wins over neighbours."""
    kind: str
    """vowel, bilabial, labial (rounded lips all but closed: /w/), labiodental, consonant, pause."""


def _v(o: float, r: float, s: float) -> Viseme:
    # Vowels hold jaw and lip shape firmly, and hold the lower lip out of any tuck.
    return Viseme((o, r, s, 0.0), (1.0, 1.0, 1.0, 1.0), "vowel")


def _c(o: float, r: float = 0.0, s: float = 0.0, d_open: float = 0.6, d_round: float = 0.25, d_spread: float = 0.25) -> Viseme:
    return Viseme((o, r, s, 0.0), (d_open, d_round, d_spread, 0.5), "consonant")


_TABLE: dict[str, Viseme] = {
    # mouth_open here is in speech units: 1 is the widest opening of conversational speech (driving
    # scales it to the renderer's range). Openness follows lip aperture: open vowels > mid > close,
    # rounded below unrounded of the same height. Calibrated on real talkers (the kit's GRID clips,
    # MediaPipe's inner-lip gap over each talker's p95, per aligned phone): /eɪ/ .97, /ɛ/ .94,
    # /aɪ/ .86, /ɪ/ .81, /i/ .71, /u/ .60; in careful speech the close vowels' lips stay further
    # apart than their jaw height suggests (spread lips show the teeth). Vowels the clips lack
    # follow the ranking: /ɑ/ >= /a/, /æ/ > /ʌ/, /ɔ/ > /ə/.
    # Open vowels: wide jaw.
    "a": _v(0.95, 0.0, 0.25),
    "ɑ": _v(1.0, 0.05, 0.0),
    "æ": _v(0.95, 0.0, 0.4),
    "ʌ": _v(0.85, 0.0, 0.1),
    "ɔ": _v(0.85, 0.55, 0.0),
    "ɒ": _v(0.9, 0.35, 0.0),
    "ɐ": _v(0.8, 0.0, 0.1),
    # Mid vowels.
    "ɛ": _v(0.9, 0.0, 0.5),
    "e": _v(0.88, 0.0, 0.6),
    "ə": _v(0.65, 0.0, 0.1),
    "ɜ": _v(0.65, 0.3, 0.0),
    "ɝ": _v(0.5, 0.45, 0.0),
    "ɚ": _v(0.5, 0.45, 0.0),
    "o": _v(0.65, 0.75, 0.0),
    "ɵ": _v(0.6, 0.6, 0.0),
    "ø": _v(0.55, 0.7, 0.2),
    "œ": _v(0.68, 0.6, 0.1),
    # Close vowels: little jaw, strong lip shape.
    "ɪ": _v(0.8, 0.0, 0.6),
    "i": _v(0.72, 0.0, 0.9),
    "ᵻ": _v(0.75, 0.0, 0.5),
    "ɨ": _v(0.7, 0.0, 0.4),
    "y": _v(0.5, 0.85, 0.0),
    "ʊ": _v(0.55, 0.7, 0.0),
    "u": _v(0.55, 0.95, 0.0),
    "ʉ": _v(0.55, 0.8, 0.0),
    "ɯ": _v(0.65, 0.0, 0.5),
    # Bilabials: sealed lips. Driving enforces the seal with a gate around each centre, so the jaw
    # dominance here stays modest: a strong one would close the neighbouring vowels twice.
    "m": Viseme((0.0, 0.0, 0.0, 0.0), (0.5, 0.3, 0.3, 1.0), "bilabial"),
    "b": Viseme((0.0, 0.0, 0.0, 0.0), (0.5, 0.3, 0.3, 1.0), "bilabial"),
    "p": Viseme((0.0, 0.0, 0.0, 0.0), (0.5, 0.3, 0.3, 1.0), "bilabial"),
    # Labiodentals: lower lip under the upper teeth.
    "f": Viseme((0.1, 0.0, 0.15, 1.0), (1.5, 0.3, 0.5, 1.5), "labiodental"),
    "v": Viseme((0.1, 0.0, 0.15, 1.0), (1.5, 0.3, 0.5, 1.5), "labiodental"),
    # The tongue makes the other consonants, so the lips stay near the neighbouring vowels' opening,
    # a little closed (weak jaw dominance; GRID talkers: /t/ .54, /n/ .59, /s/ .66, /z/ .72 of the p95).
    # Dentals: tongue between the teeth, lips slightly apart.
    "θ": _c(0.3, 0.0, 0.15, d_open=0.6),
    "ð": _c(0.3, 0.0, 0.15, d_open=0.5),
    # Alveolars; sibilants bring the teeth together and spread a little.
    "t": _c(0.4, 0.0, 0.2, d_open=0.35),
    "d": _c(0.4, 0.0, 0.2, d_open=0.35),
    "n": _c(0.38, 0.0, 0.15, d_open=0.35),
    "l": _c(0.45, 0.0, 0.15, d_open=0.3),
    "ɾ": _c(0.45, 0.0, 0.15, d_open=0.25),
    "s": _c(0.3, 0.0, 0.35, d_open=0.5, d_spread=0.6),
    "z": _c(0.32, 0.0, 0.35, d_open=0.5, d_spread=0.6),
    # Postalveolars: protruded, rounded lips over close teeth.
    "ʃ": _c(0.22, 0.6, 0.0, d_open=0.7, d_round=0.9),
    "ʒ": _c(0.22, 0.6, 0.0, d_open=0.7, d_round=0.9),
    "tʃ": _c(0.22, 0.6, 0.0, d_open=0.7, d_round=0.9),
    "dʒ": _c(0.22, 0.6, 0.0, d_open=0.7, d_round=0.9),
    # Velars and glottals: shaped by the neighbouring vowels.
    "k": _c(0.45, d_open=0.3),
    "ɡ": _c(0.45, d_open=0.3),
    "g": _c(0.45, d_open=0.3),
    "ŋ": _c(0.4, d_open=0.3),
    "x": _c(0.45, d_open=0.3),
    "h": _c(0.45, d_open=0.1, d_round=0.1, d_spread=0.1),
    "ʔ": _c(0.2, d_open=0.4),
    # Approximants. English /r/ is rounded; /w/ all but closes the lips (GRID: 0.00-0.03 of the p95
    # at its centre, from the consonant before it on), which driving enforces like a seal, only
    # not quite shut (kind "labial").
    "ɹ": _c(0.15, 0.6, 0.0, d_open=0.8, d_round=0.8),
    "r": _c(0.15, 0.5, 0.0, d_open=0.8, d_round=0.7),
    "w": Viseme((0.05, 0.95, 0.0, 0.0), (1.5, 1.5, 0.25, 0.5), "labial"),
    "j": _c(0.35, 0.0, 0.6, d_open=0.5, d_spread=0.8),
    "ç": _c(0.3, 0.0, 0.5),
    # Pause: relax to closed (driving also gates the mouth shut inside long pauses).
    PAUSE: Viseme((0.0, 0.0, 0.0, 0.0), (0.8, 0.5, 0.5, 0.5), "pause"),
}

_DEFAULT = _c(0.4, d_open=0.3)

OFFGLIDE = "\u032f"
"""The non-syllabic mark: driving writes it on a diphthong's second part ("ʊ̯" of "aʊ")."""
# A diphthong's offglide heads for the consonant of its vowel: /ʊ/ for /w/ (the lips round and
# nearly close: GRID's "now" ends at 0.00-0.13 of the p95), /ɪ/ for /j/ (spread and still
# fairly open: "white", "by" keep 0.6-0.9 until the next consonant).
_OFFGLIDES: dict[str, Viseme] = {
    "ʊ": _v(0.2, 0.9, 0.0),
    "u": _v(0.2, 0.9, 0.0),
    "ɪ": _v(0.6, 0.0, 0.6),
    "i": _v(0.55, 0.0, 0.7),
    "ə": _v(0.5, 0.0, 0.1),
}


def base_symbol(phoneme: str) -> str:
    """The phoneme without stress, length and other modifier marks ("ˈɑː" -> "ɑ")."""
    stripped = "".join(ch for ch in phoneme if ch not in _MODIFIERS)
    return stripped or phoneme


def viseme(phoneme: str) -> Viseme:
    """The viseme of an IPA phoneme; unknown symbols get a neutral, weakly held consonant shape."""
    sym = base_symbol(phoneme)
    if OFFGLIDE in phoneme and sym in _OFFGLIDES:
        return _OFFGLIDES[sym]
    if sym in _TABLE:
        return _TABLE[sym]
    # Multi-letter symbols (affricates, diphthongs Piper did not split): use the first letter.
    if sym[:1] in _TABLE:
        return _TABLE[sym[:1]]
    return _DEFAULT


def glides(phoneme: str) -> list[str]:
    """A diphthong's parts, nucleus first and the offglide marked ("aɪ" -> ["a", "ɪ̯"]); any other phoneme alone.

    Piper writes diphthongs as two phonemes already; an aligner that writes one symbol for
    both would otherwise hold the nucleus's shape to the end (the jaw of "now" closes on its /ʊ/).
    Stress marks stay on the nucleus.
    """
    sym = base_symbol(phoneme)
    parts = [ch for ch in sym]
    if len(parts) == 2 and all(_TABLE.get(ch, _DEFAULT).kind == "vowel" for ch in parts):
        cut = phoneme.rindex(parts[1])
        return [phoneme[:cut] + phoneme[cut + 1:], parts[1] + OFFGLIDE]
    return [phoneme]


def is_offglide(prev: str, phoneme: str) -> bool:
    """True when `phoneme` right after vowel `prev` is the second part of a diphthong (Piper writes "a", "ɪ")."""
    return is_vowel(prev) and base_symbol(phoneme) in _OFFGLIDES and base_symbol(prev) not in _OFFGLIDES


def is_bilabial(phoneme: str) -> bool:
    """True for m, b, p (lips must seal)."""
    return viseme(phoneme).kind == "bilabial"


def is_vowel(phoneme: str) -> bool:
    """True for vowel phonemes."""
    return viseme(phoneme).kind == "vowel"


def table_arrays(phonemes: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Targets (K, 4), dominances (K, 4) and kinds for a phoneme sequence."""
    vis = [viseme(p) for p in phonemes]
    targets = np.array([v.targets for v in vis], dtype=np.float64).reshape(-1, 4)
    dominance = np.array([v.dominance for v in vis], dtype=np.float64).reshape(-1, 4)
    return targets, dominance, [v.kind for v in vis]
