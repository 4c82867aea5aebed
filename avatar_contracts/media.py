"""Checks of uploaded media shared by the services: base64 decoding, image headers, portrait backgrounds.

Pure Python (no Pillow, no OpenCV), so the runtime can refuse a bad upload at its boundary
without the GPU service's dependencies. The image check reads the header only: a small file
that claims 30000x30000 pixels is refused before anything allocates the pixels.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Optional

from avatar_contracts.errors import BadMedia


# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD9)) | {0x01}


def decode_base64(value: str, field: str, max_bytes: Optional[int] = None) -> bytes:
    """Strict base64 (a `data:...;base64,` prefix allowed) to bytes, or BadMedia (422) naming the field.

    With `max_bytes`, an over-long value is refused from its length, before it is decoded.
    """
    if not isinstance(value, str):
        raise BadMedia(f"{field} must be a base64 string")
    text = value.strip()
    if text.startswith("data:") and "," in text[:256]:
        text = text.split(",", 1)[1]
    if max_bytes is not None and len(text) > (max_bytes * 4) // 3 + 8:
        raise BadMedia(f"{field} is larger than the {max_bytes} byte limit")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadMedia(f"{field} is not valid base64") from None
    if not raw:
        raise BadMedia(f"{field} is empty")
    if max_bytes is not None and len(raw) > max_bytes:
        raise BadMedia(f"{field} is {len(raw)} bytes; the limit is {max_bytes} bytes")
    return raw


def _png_size(raw: bytes) -> Optional[tuple[int, int]]:
    if raw[12:16] != b"IHDR" or len(raw) < 24:
        return None
    return struct.unpack(">II", raw[16:24])


def _jpeg_size(raw: bytes) -> Optional[tuple[int, int]]:
    pos = 2
    while pos + 4 <= len(raw):
        if raw[pos] != 0xFF:
            return None
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header: not a usable JPEG
            return None
        (length,) = struct.unpack(">H", raw[pos + 2:pos + 4])
        if marker in _SOF:
            if pos + 9 > len(raw):
                return None
            height, width = struct.unpack(">HH", raw[pos + 5:pos + 9])
            return width, height
        pos += 2 + length
    return None


def _webp_size(raw: bytes) -> Optional[tuple[int, int]]:
    chunk, data = raw[12:16], raw[20:]
    if chunk == b"VP8 " and len(data) >= 10 and data[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[6:10])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 5 and data[0] == 0x2F:
        bits = int.from_bytes(data[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 10:
        return int.from_bytes(data[4:7], "little") + 1, int.from_bytes(data[7:10], "little") + 1
    return None


def check_image_header(raw: bytes, max_pixels: int, field: str = "image") -> tuple[int, int, str]:
    """(width, height, format) of a PNG, JPEG or WebP from its header alone; BadMedia when it is none
    of those, or when width x height exceeds `max_pixels` (a decompression bomb is refused undecoded)."""
    size, kind = None, None
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        size, kind = _png_size(raw), "png"
    elif raw.startswith(b"\xff\xd8\xff"):
        size, kind = _jpeg_size(raw), "jpeg"
    elif raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        size, kind = _webp_size(raw), "webp"
    if kind is None:
        raise BadMedia(f"{field} is not a JPEG, PNG or WebP image")
    if size is None:
        raise BadMedia(f"{field} looks like a {kind.upper()} file but its header is damaged or cut short")
    width, height = size
    if width <= 0 or height <= 0:
        raise BadMedia(f"{field} claims a size of {width}x{height} pixels")
    if width * height > max_pixels:
        raise BadMedia(
            f"{field} is {width}x{height} pixels ({width * height} in all); the limit is {max_pixels} pixels"
        )
    return width, height, kind


def image_has_alpha(raw: bytes) -> bool:
    """Whether a PNG or WebP can carry transparency, from its header and chunks alone (JPEG never does).

    PNG: a grey+alpha or RGBA colour type, or a tRNS chunk before the image data. WebP: the
    extended header's alpha flag, or a lossless stream that says it uses alpha.
    """
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(raw) >= 26 and raw[12:16] == b"IHDR" and raw[25] in (4, 6):
            return True
        pos = 8
        while pos + 8 <= len(raw):
            (length,) = struct.unpack(">I", raw[pos:pos + 4])
            kind = raw[pos + 4:pos + 8]
            if kind == b"tRNS":
                return True
            if kind in (b"IDAT", b"IEND"):
                return False
            pos += 12 + length
        return False
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        chunk, data = raw[12:16], raw[20:]
        if chunk == b"VP8X":
            return len(data) >= 1 and bool(data[0] & 0x10)
        if chunk == b"VP8L" and len(data) >= 5:
            return bool((int.from_bytes(data[1:5], "little") >> 28) & 1)
    return False


DEFAULT_BACKGROUND = "#e9e6e1"
"""What a transparent portrait is composited on when the request names no background: a neutral light grey."""
_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")


@dataclass(frozen=True)
class Background:
    """What a portrait's transparent pixels are composited on: one colour, or an image (bytes, header-checked)."""

    colour: Optional[tuple[int, int, int]] = None
    """(r, g, b) in 0..255, when the background is a colour."""
    image: Optional[bytes] = None
    """JPEG, PNG or WebP bytes, when the background is an image (scaled to cover the portrait)."""

    @property
    def key(self) -> str:
        """A short name of this background for cache keys: the colour's hex, or the image's content hash."""
        if self.image is not None:
            return "i" + hashlib.sha256(self.image).hexdigest()[:16]
        r, g, b = self.colour or (0, 0, 0)
        return f"c{r:02x}{g:02x}{b:02x}"


def parse_background(value: Optional[str], max_bytes: int, max_pixels: int, field: str = "background") -> Background:
    """A request's `background` (`#rrggbb`, or a base64 JPEG/PNG/WebP image; None: DEFAULT_BACKGROUND), or
    BadMedia naming the field. An image is checked from its header only; decoding it is the GPU service's."""
    text = DEFAULT_BACKGROUND if value is None else value
    if not isinstance(text, str):
        raise BadMedia(f"{field} must be a colour as #rrggbb or a base64 image")
    text = text.strip()
    if text.startswith("#"):
        if not _COLOUR.fullmatch(text):
            raise BadMedia(f"{field} {text[:16]!r} is not a colour; write it as #rrggbb (e.g. {DEFAULT_BACKGROUND}) "
                           f"or send a base64 image")
        return Background(colour=(int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16)))
    raw = decode_base64(text, field, max_bytes)
    try:
        check_image_header(raw, max_pixels, field)
    except BadMedia as exc:
        raise BadMedia(f"{exc.message} (background is a colour as #rrggbb or a base64 image)") from None
    return Background(image=raw)
