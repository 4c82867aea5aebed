"""Phoneme timings for speech that arrives without them (uploaded audio, XTTS, lip-sync audio).

With the text: forced alignment. Words come from the text (pronunciations from CMUdict, a crude
spelling rule for words it lacks), times from pocketsphinx's acoustic model: a word pass over
the whole clip, then a phone pass per stretch of at most SEGMENT_S between silences (the phone
pass keeps a backtrace of every state in every frame, so its memory grows with the square of
the length). Without the text, or when the alignment fails: phone recognition (pocketsphinx's
allphone search with the model's phone bigram). Either way the ARPAbet phones become the IPA
symbols the driving reads from Piper (talking_head/visemes.py), with " " between words and "_"
for silence, contiguous over the whole clip. When pocketsphinx is missing or hears no speech,
the answer is empty with the source "envelope": driving then follows the audio's envelope.

Times are pocketsphinx's: a phone starts at its first 10 ms frame (start_frame * 10 ms), the
convention of the reference alignments in the media kit. Accuracy and cost on real speech:
benchmarks/bench_alignment.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from avatar_contracts.gpu import TimingSource
from gpu_service.speech.protocol import Phone

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
"""pocketsphinx's en-us model is trained on 16 kHz audio."""
FRAME_S = 0.01
_HOP = int(SAMPLE_RATE * FRAME_S)
SEGMENT_S = 20.0
"""Longest stretch given to one phone pass (its memory: 19 MB for 29 s of speech, 170 MB for 87 s)."""
MAX_DECODERS = 4
"""Decoders alive at once (27 MB each); further callers wait for one to be free."""
MAX_ADDED_WORDS = 2000
"""Out-of-dictionary words a decoder learns before it is dropped (its dictionary only grows)."""
ALLPHONE_LW = 2.0
"""Weight of the phone bigram in phone recognition. CMU's own recipe for phoneme recognition uses
2.0; on the media kit's four clips it found as many m/b/p as the default 6.5 with fewer false ones."""
QUIET_PHONE_FRAMES = 15
"""A recognised phone this long (150 ms) that is mostly below the noise gate is taken as a pause."""
SHORT_AH_S = 0.09
"""An AH shorter than this is taken as unstressed (schwa): CMUdict as bundled carries no stress."""

ARPABET_TO_IPA: dict[str, str] = {
    "AA": "ɑ", "AE": "æ", "AH": "ʌ", "AO": "ɔ", "AW": "aʊ", "AY": "aɪ", "EH": "ɛ", "ER": "ɚ",
    "EY": "eɪ", "IH": "ɪ", "IY": "i", "OW": "oʊ", "OY": "ɔɪ", "UH": "ʊ", "UW": "u",
    "B": "b", "CH": "tʃ", "D": "d", "DH": "ð", "F": "f", "G": "ɡ", "HH": "h", "JH": "dʒ", "K": "k",
    "L": "l", "M": "m", "N": "n", "NG": "ŋ", "P": "p", "R": "ɹ", "S": "s", "SH": "ʃ", "T": "t",
    "TH": "θ", "V": "v", "W": "w", "Y": "j", "Z": "z", "ZH": "ʒ",
    "SIL": "_",
    "+NSN+": "_",  # noise: the speaker is not shaping a sound
    "+SPN+": "ə",  # spoken noise (a hesitation, an unclear sound): a voice, so a neutral opening
}
"""Every phone of pocketsphinx's en-us model, as the IPA Piper (espeak) writes for US English."""

_PAUSE, _BOUNDARY = "_", " "


def ipa(arpabet: str, duration_s: float = 1.0) -> str:
    """The IPA symbol of an ARPAbet phone (stress digits ignored); AH by its length, ʌ or ə."""
    base = arpabet.rstrip("012")
    if base == "AH" and duration_s < SHORT_AH_S:
        return "ə"
    return ARPABET_TO_IPA.get(base, _PAUSE if base.startswith(("+", "<", "[")) else "ə")


# -- text -----------------------------------------------------------------------------------------
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> list[str]:
    """English words of a whole number below a million (years 1100-1999 read in pairs)."""
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + (number_words(n % 10) if n % 10 else [])
    if 1100 <= n < 2000 and n % 100:
        return number_words(n // 100) + number_words(n % 100)
    if n < 1000:
        return [_ONES[n // 100], "hundred"] + (number_words(n % 100) if n % 100 else [])
    if n < 1_000_000:
        return number_words(n // 1000) + ["thousand"] + (number_words(n % 1000) if n % 1000 else [])
    return [w for digit in str(n) for w in number_words(int(digit))]


def text_words(text: str) -> list[str]:
    """The words to align: lower case, numbers spelled out, punctuation dropped."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    words: list[str] = []
    for token in re.findall(r"[a-z0-9']+", text):
        for part in re.findall(r"\d+|[a-z']+", token):
            if part.isdigit():
                words += number_words(int(part))
            elif part.strip("'"):
                words.append(part.strip("'"))
    return words


# Longest spellings first; enough to give a name or a made-up word a plausible length and its
# m/b/p (which are spelled as they sound), not a real pronunciation.
_SPELLING = sorted({
    "tch": "CH", "igh": "AY", "ch": "CH", "sh": "SH", "th": "TH", "ph": "F", "wh": "W", "ng": "NG",
    "ck": "K", "qu": "K W", "kn": "N", "wr": "R", "gh": "G", "ee": "IY", "ea": "IY", "oo": "UW",
    "ou": "AW", "ow": "OW", "oa": "OW", "ai": "EY", "ay": "EY", "ey": "EY", "oi": "OY", "oy": "OY",
    "au": "AO", "aw": "AO", "er": "ER", "ir": "ER", "ur": "ER", "a": "AE", "b": "B", "c": "K", "d": "D",
    "e": "EH", "f": "F", "g": "G", "h": "HH", "i": "IH", "j": "JH", "k": "K", "l": "L", "m": "M", "n": "N",
    "o": "AA", "p": "P", "q": "K", "r": "R", "s": "S", "t": "T", "u": "AH", "v": "V", "w": "W",
    "x": "K S", "y": "IY", "z": "Z",
}.items(), key=lambda kv: -len(kv[0]))


def spell(word: str) -> str:
    """A crude ARPAbet pronunciation of a word CMUdict lacks, from its letters."""
    w = re.sub(r"(.)\1", r"\1", re.sub(r"[^a-z]", "", word.lower()))
    if len(w) > 3 and w.endswith("e") and w[-2] not in "aeiouy":
        w = w[:-1]  # silent final e
    phones: list[str] = []
    i = 0
    while i < len(w):
        for letters, sound in _SPELLING:
            if w.startswith(letters, i):
                phones.append("Y" if letters == "y" and i == 0 else sound)
                i += len(letters)
                break
    return " ".join(phones) or "AH"


# -- audio ----------------------------------------------------------------------------------------
def pcm16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """16 kHz 16-bit samples of mono float audio at any rate (polyphase resampling), dithered by one step.

    The dither is fixed (seeded), so it is the same on every call: without it pocketsphinx heard a
    second of digital silence as one long "p" or "f".
    """
    from scipy.signal import resample_poly

    a = np.asarray(audio, dtype=np.float32).reshape(-1)
    if int(sample_rate) != SAMPLE_RATE:
        g = math.gcd(int(sample_rate), SAMPLE_RATE)
        a = resample_poly(a, SAMPLE_RATE // g, int(sample_rate) // g)
    pcm = np.clip(np.nan_to_num(a), -1.0, 1.0) * 32766.0 + np.random.default_rng(0).integers(-1, 2, a.size)
    return np.round(pcm).astype("<i2")


# -- decoders -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether pocketsphinx and its bundled en-us model can be used here."""
    try:
        from pocketsphinx import get_model_path
    except ImportError:
        return False
    import os

    return all(os.path.exists(get_model_path(p)) for p in ("en-us/en-us", "en-us/cmudict-en-us.dict",
                                                           "en-us/en-us-phone.lm.bin"))


class _Decoder:
    """One pocketsphinx decoder with both searches: text alignment and allphone recognition."""

    def __init__(self) -> None:
        from pocketsphinx import Decoder, get_model_path

        # bestpath off: with it the phone pass failed on a clip whose speech starts at 0 s (kit a01).
        self.ps = Decoder(lm=None, bestpath=False, lw=ALLPHONE_LW, loglevel="FATAL")
        self.ps.add_allphone_file("allphone", get_model_path("en-us/en-us-phone.lm.bin"))
        self.added = 0

    def decode(self, pcm: np.ndarray) -> None:
        """Run the active search over a whole utterance."""
        # Feature extraction carries state from one utterance into the next (the first utterance
        # of a decoder was heard differently from the same audio later): reset it, so the same
        # audio always gets the same timings whichever decoder of the pool serves it.
        self.ps.reinit_feat()
        self.ps.start_utt()
        self.ps.process_raw(pcm.tobytes(), full_utt=True)
        self.ps.end_utt()

    def know(self, words: Sequence[str]) -> None:
        """Give the dictionary a spelled pronunciation of every word it lacks."""
        for w in dict.fromkeys(words):
            if self.ps.lookup_word(w) is None:
                self.ps.add_word(w, spell(w), False)
                self.added += 1


class _DecoderPool:
    """Decoders built on first use and reused; each serves one call at a time (pocketsphinx is not thread-safe)."""

    def __init__(self, limit: int) -> None:
        self._idle: list[_Decoder] = []
        self._lock = threading.Lock()
        self._free = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def decoder(self) -> Iterator[_Decoder]:
        """A decoder for this thread until the block ends; one that raised is dropped, not reused."""
        with self._free:
            with self._lock:
                dec = self._idle.pop() if self._idle else None
            if dec is None:
                started = time.perf_counter()
                dec = _Decoder()
                log.info("alignment decoder built", extra={"ms": round((time.perf_counter() - started) * 1000)})
            yield dec
            if dec.added <= MAX_ADDED_WORDS:
                with self._lock:
                    self._idle.append(dec)


_POOL = _DecoderPool(MAX_DECODERS)


def warmup() -> bool:
    """Build a decoder now so the first request does not pay for it; False when alignment is unavailable."""
    if not available():
        return False
    with _POOL.decoder():
        return True


# -- passes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Seg:
    """A phone (or a whole word in the word pass) in frames; word is the word's index, None for fillers."""

    name: str
    start: int
    end: int
    word: Optional[int] = None


def _filler(name: str) -> bool:
    return name.startswith(("<", "[", "+")) or name == "SIL"


def _word_pass(dec: _Decoder, pcm: np.ndarray, words: Sequence[str]) -> list[_Seg]:
    """Word spans (fillers included) of the text over the audio; RuntimeError when no path fits."""
    dec.ps.set_align_text(" ".join(words))
    dec.decode(pcm)
    return [_Seg(s.word, s.start_frame, s.end_frame + 1) for s in dec.ps.seg() or []]


def _phone_pass(dec: _Decoder, pcm: np.ndarray, first_word: int) -> list[_Seg]:
    """Phone spans of the current word hypothesis, re-aligned state by state over the same audio."""
    dec.ps.set_alignment()
    dec.decode(pcm)
    out: list[_Seg] = []
    index = first_word
    for word in dec.ps.get_alignment():
        filler = _filler(word.name)
        for phone in word:
            out.append(_Seg(phone.name, phone.start, phone.start + phone.duration, None if filler else index))
        index += 0 if filler else 1
    return out


def _spread(dec: _Decoder, spans: Sequence[_Seg]) -> list[_Seg]:
    """Phones shared out evenly over each word's span: the fallback when a phone pass fails."""
    out: list[_Seg] = []
    for s in spans:
        pron = None if s.word is None else dec.ps.lookup_word(s.name)
        phones = pron.split() if pron else ["SIL"]
        n = min(len(phones), max(s.end - s.start, 1))
        edges = np.linspace(s.start, s.end, n + 1).round().astype(int)
        out += [_Seg(p, int(a), int(b), s.word) for p, a, b in zip(phones[:n], edges[:-1], edges[1:])]
    return out


def _segments(spans: list[_Seg], limit: int) -> list[list[_Seg]]:
    """Runs of word spans of at most `limit` frames, cut after a silence where possible, else between words."""
    groups: list[list[_Seg]] = [[]]
    last_quiet = None
    for s in spans:
        group = groups[-1]
        if group and s.end - group[0].start > limit:
            cut = last_quiet if last_quiet is not None else len(group)
            groups[-1], rest = group[:cut], group[cut:]
            groups.append(rest)
            last_quiet = None
        groups[-1].append(s)
        if s.word is None:
            last_quiet = len(groups[-1])
    return [g for g in groups if g]


def forced_alignment(dec: _Decoder, pcm: np.ndarray, words: Sequence[str]) -> list[_Seg]:
    """Phone spans of the text's words over the audio; RuntimeError when the text cannot be aligned."""
    dec.know(words)
    spans = _word_pass(dec, pcm, words)
    indexed, k = [], 0
    for s in spans:
        indexed.append(_Seg(s.name, s.start, s.end, None if _filler(s.name) else k))
        k += 0 if _filler(s.name) else 1
    if k == 0:
        raise RuntimeError("the word pass placed no word")
    groups = _segments(indexed, int(SEGMENT_S / FRAME_S))
    out: list[_Seg] = []
    for n, group in enumerate(groups):
        a, b = group[0].start, group[-1].end
        # The whole clip's first and last samples belong to the first and last stretch: the phone
        # pass must see exactly the audio its word hypothesis was made on.
        chunk = pcm[(0 if n == 0 else a * _HOP): (len(pcm) if n == len(groups) - 1 else b * _HOP)]
        first = next((s.word for s in group if s.word is not None), None)
        try:
            if first is None:
                phones = [_Seg("SIL", 0, b - a)]
            else:
                if len(groups) > 1:  # the phone pass aligns the decoder's current hypothesis: make it this stretch's
                    _word_pass(dec, chunk, [s.name for s in group if s.word is not None])
                phones = _phone_pass(dec, chunk, first)
        except RuntimeError:
            log.info("phone pass failed; phones spread over the words", extra={"segment": n, "frames": b - a})
            phones = [_Seg(s.name, s.start - a, s.end - a, s.word) for s in _spread(dec, group)]
        out += [_Seg(p.name, p.start + a, p.end + a, p.word) for p in phones]
    return out


_VOWELS = frozenset(("AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"))


def _onglides(segs: Sequence[_Seg]) -> list[_Seg]:
    """A high back rounded vowel run straight into another vowel is the glide /w/.

    Phonetically [u] before a vowel is [w]: the lips round and close in it, then open for the vowel.
    The recogniser has no word list to tell them apart and, with no consonant between, often writes
    "w" as a short UW or UH ("set white" came out as "s eh d uw oy": the lips that seal for "t w" stayed
    open for a vowel). A rounded vowel that ends the run (before a consonant or a silence) stays a vowel.
    """
    out = list(segs)
    for i in range(len(out) - 1):
        a, b = out[i], out[i + 1]
        if a.name in ("UW", "UH") and b.name in _VOWELS and b.name not in ("UW", "UH") and b.start == a.end:
            out[i] = _Seg("W", a.start, a.end, a.word)
    return out


def phone_recognition(dec: _Decoder, pcm: np.ndarray) -> list[_Seg]:
    """Phone spans heard in the audio with no text: allphone search with the phone bigram, onglides as /w/."""
    dec.ps.activate_search("allphone")
    dec.decode(pcm)
    return _onglides([_Seg(s.word, s.start_frame, s.end_frame + 1) for s in dec.ps.seg() or []])


def _quiet_as_pause(segs: Sequence[_Seg], audio: np.ndarray, sample_rate: int) -> list[_Seg]:
    """Long recognised phones that lie mostly under the audio's noise gate become silence.

    Without text nothing tells the recogniser that a pause is a pause: in a noisy recording
    (kit a04, outdoor public address) it heard the hiss of each pause as a 0.3-0.6 s "th" or "h".
    The gate is the driving's own (audio_envelope), so these pauses are the ones it would close.
    Short phones stay whatever their level: a b/p closure is silent and an m is quiet.
    """
    from gpu_service.talking_head.driving import audio_envelope

    t = (np.arange(max((s.end for s in segs), default=0)) + 0.5) * FRAME_S
    _, speech = audio_envelope(np.asarray(audio, dtype=np.float32).reshape(-1), int(sample_rate), t)
    return [_Seg("SIL", s.start, s.end) if s.end - s.start >= QUIET_PHONE_FRAMES
            and speech[s.start:s.end].mean() < 0.5 else s for s in segs]


def to_phones(segs: Sequence[_Seg], duration_s: float) -> list[Phone]:
    """IPA phones covering [0, duration_s]: silences merged into one "_", a zero-length " " between words."""
    out: list[Phone] = []

    def add(sym: str, s: float, e: float) -> None:
        if sym == _PAUSE and out and out[-1].phoneme == _PAUSE:
            out[-1] = Phone(_PAUSE, out[-1].start_s, e)
        else:
            out.append(Phone(sym, s, e))

    prev_word = None
    for seg in segs:
        s, e = min(seg.start * FRAME_S, duration_s), min(seg.end * FRAME_S, duration_s)
        if e <= s:
            continue
        if out and s > out[-1].end_s + 1e-9:
            add(_PAUSE, out[-1].end_s, s)
        sym = ipa(seg.name, e - s)
        if sym != _PAUSE and seg.word is not None and prev_word is not None and seg.word != prev_word \
                and out and out[-1].phoneme != _PAUSE:
            out.append(Phone(_BOUNDARY, s, s))
        if sym != _PAUSE and seg.word is not None:
            prev_word = seg.word
        add(sym, s, e)
    if out and out[0].start_s > 0:
        out.insert(0, Phone(_PAUSE, 0.0, out[0].start_s))
    if out and out[-1].end_s < duration_s:
        add(_PAUSE, out[-1].end_s, duration_s)
    return out


def _spoken(phones: Sequence[Phone]) -> bool:
    return any(p.phoneme not in (_PAUSE, _BOUNDARY) for p in phones)


def align(audio: np.ndarray, sample_rate: int, text: Optional[str] = None,
          language: str = "en") -> tuple[list[Phone], TimingSource]:
    """IPA phoneme timings of mono speech, and how they were found (forced_alignment, phone_recognition, envelope)."""
    if not available():
        return [], "envelope"
    started = time.perf_counter()
    pcm = pcm16k(audio, sample_rate)
    duration = len(audio) / float(sample_rate)
    words = text_words(text) if text and language.lower().startswith("en") else []
    phones: list[Phone] = []
    source: TimingSource = "envelope"
    try:
        with _POOL.decoder() as dec:
            if words:
                try:
                    phones = to_phones(forced_alignment(dec, pcm, words), duration)
                    source = "forced_alignment"
                except RuntimeError as exc:
                    log.info("forced alignment failed; recognising phones", extra={"why": str(exc)})
            if not _spoken(phones):
                phones = to_phones(_quiet_as_pause(phone_recognition(dec, pcm), audio, sample_rate), duration)
                source = "phone_recognition"
    except Exception:  # the envelope still gives a moving mouth: never fail a video over its timings
        log.warning("alignment failed; the mouth follows the envelope", exc_info=True)
        phones = []
    if not _spoken(phones):
        phones, source = [], "envelope"
    log.info("aligned", extra={"source": source, "audio_s": round(duration, 3), "phones": len(phones),
                               "words": len(words), "ms": round((time.perf_counter() - started) * 1000, 1)})
    return phones, source


def timings_for(audio: np.ndarray, sample_rate: int, phonemes: Optional[list], text: Optional[str] = None,
                language: str = "en") -> tuple[Optional[list], TimingSource]:
    """The request's own phonemes when it has them (source "request"), else those align() derives (None when none)."""
    if phonemes:
        return phonemes, "request"
    derived, source = align(audio, sample_rate, text, language)
    return (derived or None), source
