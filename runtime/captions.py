"""WebVTT captions from the speech engine's phoneme timings.

The engine's phonemes mark word boundaries (" ") and pauses ("_"), so each spoken word gets a
start and end. When the engine's word count matches the text's (the usual case) the text's
words take those times; otherwise (numbers read out, abbreviations expanded) the text's words
are spread over the spoken span in proportion to their length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

MAX_CUE_CHARS = 42
MAX_CUE_S = 4.0


@dataclass
class Word:
    """A word of the text and when it is spoken, in seconds from the start of the video."""

    text: str
    start_s: float
    end_s: float


def spoken_words(phonemes: Iterable[dict]) -> list[tuple[float, float]]:
    """(start, end) of each word the engine spoke, from phonemes with " "/"_" boundaries."""
    words: list[tuple[float, float]] = []
    start = end = None
    for ph in phonemes:
        symbol = ph["phoneme"]
        if symbol in (" ", "_") or not symbol.strip():
            if start is not None:
                words.append((start, end))
                start = end = None
            continue
        if start is None:
            start = float(ph["start_s"])
        end = float(ph["end_s"])
    if start is not None:
        words.append((start, end))
    return words


def align_words(text: str, phonemes: Sequence[dict], offset_s: float, duration_s: float) -> list[Word]:
    """Timed words of one chunk, shifted by the chunk's start in the joined video."""
    tokens = text.split()
    if not tokens:
        return []
    spans = spoken_words(phonemes)
    if len(spans) == len(tokens):
        return [Word(t, offset_s + s, offset_s + e) for t, (s, e) in zip(tokens, spans)]
    lo = spans[0][0] if spans else 0.0
    hi = spans[-1][1] if spans else duration_s
    if hi <= lo:
        lo, hi = 0.0, max(duration_s, 0.1)
    weights = [len(t) + 1 for t in tokens]
    total = float(sum(weights))
    words, cursor = [], lo
    for token, weight in zip(tokens, weights):
        step = (hi - lo) * weight / total
        words.append(Word(token, offset_s + cursor, offset_s + cursor + step))
        cursor += step
    return words


def _stamp(seconds: float) -> str:
    ms = int(round(max(0.0, seconds) * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def to_webvtt(words: Sequence[Word]) -> str:
    """Cues of at most ~42 characters / 4 s, broken after sentence ends."""
    lines = ["WEBVTT", ""]
    cue: list[Word] = []
    count = [0]

    def flush() -> None:
        if cue:
            count[0] += 1
            text = " ".join(w.text for w in cue).replace("-->", "->")
            lines.extend([str(count[0]), f"{_stamp(cue[0].start_s)} --> {_stamp(cue[-1].end_s)}", text, ""])
            cue.clear()

    for word in words:
        if cue:
            length = sum(len(w.text) + 1 for w in cue) + len(word.text)
            if length > MAX_CUE_CHARS or word.end_s - cue[0].start_s > MAX_CUE_S:
                flush()
        cue.append(word)
        if word.text.rstrip("\"')\u201d\u2019").endswith((".", "!", "?", "\u2026")):
            flush()
    flush()
    return "\n".join(lines)
