"""Field checks shared by the GPU service's and the runtime's models: text, URLs, times.

Each check exists once, as a plain function raising ValidationFailed (a 422 naming the field) for
code that validates by hand (multipart forms), and as an annotated type for the pydantic models.
Messages never repeat the offending value: it may not even be encodable (a lone surrogate).
"""

from __future__ import annotations

import re
from typing import Annotated, Optional
from urllib.parse import SplitResult, urlsplit

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from avatar_contracts.errors import ValidationFailed

MAX_SECONDS = 3600.0
"""Longest time any request may name (a phoneme's end, a clip): an hour, far past any real chunk."""

# Unicode's control characters (category Cc) less tab, line feed and carriage return; and the surrogates.
_REFUSED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_WORD = re.compile(r"[^\W_]")  # a letter or digit of any script


def text_problem(value: str, *, speakable: bool) -> Optional[str]:
    """Why `value` is not acceptable text, or None.

    Refused: control characters other than line breaks and tabs (NUL among them), lone surrogates
    (JSON can carry them; no encoder can), and, when `speakable`, text without a letter or digit
    (only punctuation or zero-width characters): an engine makes silence of it. Empty or blank
    text is left to each service's own "text is empty" answer, which clients already know.
    """
    bad = _REFUSED.search(value)
    if bad:
        ch = bad.group()
        if "\ud800" <= ch <= "\udfff":
            return f"contains a lone surrogate (U+{ord(ch):04X}), which is not valid Unicode text"
        return f"contains the control character U+{ord(ch):04X}; only line breaks and tabs are allowed"
    if speakable and value.strip() and not _WORD.search(value):
        return "has no letters or digits to speak"
    return None


def _refuse_field(field: str, problem: Optional[str]) -> None:
    if problem:
        raise ValidationFailed(f"{field} {problem}")


def check_text(value: str, field: str, *, speakable: bool = True) -> str:
    """`value` itself, or ValidationFailed naming `field` and the problem (see text_problem)."""
    _refuse_field(field, text_problem(value, speakable=speakable))
    return value


def url_problem(value: str, *, require_host: bool) -> Optional[str]:
    """Why `value` is not an http(s) URL (or, unless `require_host`, an absolute path), or None.

    urlsplit itself raises on some inputs (an unclosed IPv6 bracket, a port that is no number):
    those are the client's mistake, a 422, never a 500 further on.
    """
    problem = text_problem(value, speakable=False)
    if problem:
        return problem
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - parsing the port raises on a bad one
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme or require_host:
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return "must be an http(s) URL with a host"
    elif not parts.path.startswith("/"):
        return "must be an http(s) URL or an absolute path"
    return None


def parse_url(value: str, field: str, *, require_host: bool = False) -> SplitResult:
    """The parts of an acceptable URL (see url_problem), or ValidationFailed naming `field`."""
    _refuse_field(field, url_problem(value, require_host=require_host))
    return urlsplit(value.strip())


def _refuse(problem_of):
    """A pydantic validator from a problem function: the message joins the model's other errors under its field."""

    def validate(value: str) -> str:
        problem = problem_of(value)
        if problem:
            raise PydanticCustomError("invalid_value", problem)
        return value

    return AfterValidator(validate)


# The control-character rule in the published schema (ECMA-262 regex), for clients and generated tests;
# the validators above enforce it (and the rest) with messages that say what is wrong.
_NO_CONTROLS = Field(json_schema_extra={"pattern": "^[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f]*$"})

CleanText = Annotated[str, _NO_CONTROLS, _refuse(lambda v: text_problem(v, speakable=False))]
"""Any text without control characters (line breaks and tabs aside) or lone surrogates."""

SpeakableText = Annotated[str, _NO_CONTROLS, _refuse(lambda v: text_problem(v, speakable=True))]
"""CleanText with at least one letter or digit: something an engine can say."""

HttpUrl = Annotated[str, Field(max_length=2048), _refuse(lambda v: url_problem(v, require_host=True))]
"""An absolute http(s) URL with a host, as a string."""

UrlOrPath = Annotated[str, Field(max_length=2048), _refuse(lambda v: url_problem(v, require_host=False))]
"""An http(s) URL or an absolute path (a URL this service returned, re-rooted or not)."""

Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
"""A time in seconds within [0, MAX_SECONDS]; NaN and infinity are refused."""
