"""Splitting long text into sentences and grouping them into generation chunks."""

from __future__ import annotations

import re

# A sentence ends at . ! ? … (optionally followed by closing quotes/brackets) and whitespace,
# unless the word before the dot is a common abbreviation or a single initial.
_END = re.compile(r"(?<=[.!?\u2026])[\"'\u201d\u2019)\]]*\s+")
_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "fig", "inc", "ltd"}


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, whitespace-normalised, never empty; abbreviations do not end one."""
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        return []
    out: list[str] = []
    start = 0
    for match in _END.finditer(text):
        piece = text[start:match.start()].rstrip()
        last_word = piece.rsplit(" ", 1)[-1].rstrip(".!?\u2026").lower()
        if piece.endswith(".") and (last_word in _ABBREV or (len(last_word) == 1 and last_word.isalpha())):
            continue
        out.append(text[start:match.end()].strip())
        start = match.end()
    if start < len(text):
        out.append(text[start:].strip())
    return [s for s in out if s]


def _split_long(sentence: str, limit: int) -> list[str]:
    """Cut an over-long sentence at clause marks, then at spaces, into pieces of at most `limit`."""
    pieces: list[str] = []
    current = ""
    for part in re.split(r"(?<=[,;:\u2014])\s+|\s+", sentence):
        candidate = f"{current} {part}".strip() if current else part
        if len(candidate) <= limit or not current:
            current = candidate
        else:
            pieces.append(current)
            current = part
    if current:
        pieces.append(current)
    # a single word longer than the limit is cut hard: speech engines choke on unbounded tokens
    return [p[i:i + limit] for p in pieces for i in range(0, len(p), limit)]


def chunk_text(text: str, target_chars: int, first_chars: int | None = None) -> list[str]:
    """Whole sentences grouped greedily into chunks of about `target_chars` (never one over 2x).

    `first_chars` caps the first chunk lower: it is generated alone before anything overlaps, so
    a short one lets speech of the next chunk run while its video renders.
    """
    chunks: list[str] = []
    current = ""
    for sentence in split_sentences(text):
        parts = _split_long(sentence, 2 * target_chars) if len(sentence) > 2 * target_chars else [sentence]
        for part in parts:
            limit = first_chars if (first_chars and not chunks) else target_chars
            if current and len(current) + 1 + len(part) > limit:
                chunks.append(current)
                current = part
            else:
                current = f"{current} {part}".strip()
    if current:
        chunks.append(current)
    return chunks
