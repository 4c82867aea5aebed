"""Splitting text for speech, once for every part: sentences, clauses, pieces of bounded length, chunks.

The runtime groups sentences into generation chunks, Piper streams sentence by sentence (a long
first sentence by clause, so audio starts early), and XTTS generates bounded pieces; all of them
cut text here, so a sentence ends at the same place whichever part looks at it.
"""

from __future__ import annotations

import re

# A sentence ends at . ! ? … (then optional closing quotes or brackets) followed by whitespace, or at a
# CJK, Arabic or Devanagari end mark with or without a space after it.
_END = re.compile(r"(?<=[.!?\u2026])[\"'\u201d\u2019)\]]*\s+|(?<=[\u3002\uff01\uff1f\u061f\u0964])\s*")
# Unless the word before the dot is a common abbreviation or a single initial.
_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "fig", "inc", "ltd"}
# A clause ends at , ; : or a dash (and their CJK forms).
_CLAUSE = re.compile(r"(?<=[,;:\u2014])\s+|(?<=[\uff0c\u3001\uff1b\uff1a])\s*")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, whitespace-normalised, never empty; abbreviations and initials do not end one."""
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


def split_clauses(sentence: str) -> list[str]:
    """A sentence's clauses (cut after , ; : and dashes), never empty."""
    return [c.strip() for c in _CLAUSE.split(sentence) if c.strip()]


def _cut_words(clause: str, limit: int) -> list[str]:
    """A clause in pieces of at most `limit` characters, at spaces; unspaced scripts (ja, zh) by characters."""
    pieces: list[str] = []
    while len(clause) > limit:
        cut = clause.rfind(" ", 0, limit + 1)
        cut = cut if cut > 0 else limit
        pieces.append(clause[:cut].strip())
        clause = clause[cut:].strip()
    if clause:
        pieces.append(clause)
    return pieces


def split_bounded(text: str, limit: int) -> list[str]:
    """Pieces of at most `limit` characters: whole sentences where they fit, else clauses, else words.

    Neighbours are merged back while they fit: fewer, longer pieces read with more natural prosody.
    """
    pieces: list[str] = []
    for sentence in split_sentences(text):
        if len(sentence) <= limit:
            pieces.append(sentence)
            continue
        for clause in split_clauses(sentence):
            pieces.extend(_cut_words(clause, limit))
    merged: list[str] = []
    for piece in pieces:
        if merged and len(merged[-1]) + 1 + len(piece) <= limit:
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            merged.append(piece)
    return merged


def chunk_text(text: str, target_chars: int, first_chars: int | None = None) -> list[str]:
    """Whole sentences grouped greedily into chunks of about `target_chars` (never one over 2x).

    `first_chars` caps the first chunk lower: it is generated alone before anything overlaps, so
    a short one lets speech of the next chunk run while its video renders.
    """
    chunks: list[str] = []
    current = ""
    for sentence in split_sentences(text):
        parts = split_bounded(sentence, 2 * target_chars) if len(sentence) > 2 * target_chars else [sentence]
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
