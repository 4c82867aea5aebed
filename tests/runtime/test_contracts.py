"""Tier 1: the shared contract checks (avatar_contracts), which both services' models use."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from pydantic import ValidationError

from avatar_contracts.errors import BadMedia, ValidationFailed
from avatar_contracts.gpu import PhonemeTiming, TTSRequest, VideoRequest
from avatar_contracts.runtime import GenerateRequest

BAD_TEXTS = {
    "nul": "a\x00b",
    "bell": "ring\x07ring",
    "lone surrogate": "ab\ud800cd",
    "zero-width only": "\u200b\u200c\u2060",
    "punctuation only": "...",
    "punctuation and spaces": " ?! \n",
}


def _errors(model, body: dict) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return info.value.errors()


@pytest.mark.parametrize("text", BAD_TEXTS.values(), ids=BAD_TEXTS.keys())
@pytest.mark.parametrize("model, extra", [(TTSRequest, {}), (GenerateRequest, {"avatar_id": "astronaut"})])
def test_unspeakable_or_broken_text_is_refused_by_the_shared_models(model, extra, text):
    errors = _errors(model, {"text": text, **extra})
    assert [e["loc"] for e in errors] == [("text",)]
    # the message names the problem but never repeats the value (a lone surrogate cannot even be encoded)
    assert errors[0]["msg"].encode("utf-8") and "\x00" not in errors[0]["msg"] and "\ud800" not in errors[0]["msg"]


@pytest.mark.parametrize("text", ["Hello there.", "Zwei\tWörter\nund 3", "日本語です", "12", "ok\u200b"])
def test_ordinary_text_is_accepted(text):
    assert TTSRequest(text=text).text == text


@pytest.mark.parametrize("body, loc", [
    ({"seed": -1}, ("seed",)),
    ({"seed": 2**32}, ("seed",)),
    ({"phonemes": [{"phoneme": "a", "start_s": 0, "end_s": 1e308}]}, ("phonemes", 0, "end_s")),
    ({"phonemes": [{"phoneme": "a", "start_s": float("nan"), "end_s": 1}]}, ("phonemes", 0, "start_s")),
    ({"phonemes": [{"phoneme": "a", "start_s": 2, "end_s": 1}]}, ("phonemes", 0)),
    ({"audio_url": "http://[::1"}, ("audio_url",)),
    ({"audio_url": "http://host:port/artifacts/x.wav"}, ("audio_url",)),
    ({"audio_url": "ftp://host/artifacts/x.wav"}, ("audio_url",)),
    ({"text": "a\x00b"}, ("text",)),
])
def test_video_request_bounds_seed_times_and_urls(body, loc):
    errors = _errors(VideoRequest, {"avatar_id": "astronaut", "audio_url": "/artifacts/x.wav", **body})
    assert [e["loc"] for e in errors] == [loc]


def test_phoneme_times_in_bounds_and_urls_in_both_forms_are_accepted():
    assert PhonemeTiming(phoneme="a", start_s=0.5, end_s=0.5).end_s == 0.5
    for url in ("http://127.0.0.1:8001/artifacts/ab.wav", "https://gpu.example/x/artifacts/ab.wav", "/artifacts/ab.wav"):
        assert VideoRequest(avatar_id="a", audio_url=url).audio_url == url
    assert VideoRequest(avatar_id="a", audio_url="/a.wav", seed=2**32 - 1).seed == 2**32 - 1


@pytest.mark.parametrize("url", ["http://[::1", "http://[::1]:99999/x", "ftp://example.com/x", "example.com/x"])
def test_a_webhook_url_that_does_not_parse_as_http_is_refused_by_the_model(url):
    errors = _errors(GenerateRequest, {"text": "hi", "webhook_url": url})
    assert [e["loc"] for e in errors] == [("webhook_url",)]


def test_the_plain_checks_raise_422_errors_naming_the_field():
    from avatar_contracts.checks import check_text, parse_url

    with pytest.raises(ValidationFailed, match="^text contains the control character U\\+0000"):
        check_text("a\x00", "text")
    with pytest.raises(ValidationFailed, match="^audio_url is not a valid URL"):
        parse_url("http://[::1", "audio_url")
    assert parse_url("/artifacts/x.wav", "audio_url").path == "/artifacts/x.wav"


# -- media --------------------------------------------------------------------------------------


def test_decode_base64_is_strict_bounded_and_names_the_field():
    from avatar_contracts.media import decode_base64

    assert decode_base64(base64.b64encode(b"abc").decode(), "audio") == b"abc"
    assert decode_base64("data:audio/wav;base64," + base64.b64encode(b"abc").decode(), "audio") == b"abc"
    for value, fragment in [("not base64!", "audio is not valid base64"), ("", "audio is empty"),
                            ("ab\ud800", "audio is not valid base64")]:
        with pytest.raises(BadMedia, match=fragment) as info:
            decode_base64(value, "audio")
        assert info.value.status_code == 422
    with pytest.raises(BadMedia, match="audio is larger than the 16 byte limit"):
        decode_base64(base64.b64encode(b"x" * 64).decode(), "audio", max_bytes=16)


def _pil_image(fmt: str, size: tuple[int, int], **options) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA" if options.pop("alpha", False) else "RGB", size, (200, 120, 40)).save(buf, fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, options, kind", [
    ("PNG", {}, "png"), ("JPEG", {}, "jpeg"), ("JPEG", {"progressive": True}, "jpeg"),
    ("WEBP", {}, "webp"), ("WEBP", {"lossless": True}, "webp"), ("WEBP", {"alpha": True}, "webp"),
])
@pytest.mark.parametrize("size", [(1, 1), (321, 123), (3000, 2)])
def test_image_header_gives_the_size_pillow_sees(fmt, options, kind, size):
    from avatar_contracts.media import check_image_header

    assert check_image_header(_pil_image(fmt, size, **options), 10**7, "avatar_image") == (*size, kind)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A small PNG whose header claims width x height (the pixel data is a few zero rows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_from_its_header():
    from avatar_contracts.media import check_image_header

    with pytest.raises(BadMedia, match=r"avatar_image is 30000x30000 pixels \(900000000 in all\); the limit is 16777216"):
        check_image_header(bomb_png(), 4096 * 4096, "avatar_image")
    assert check_image_header(bomb_png(4096, 4096), 4096 * 4096) == (4096, 4096, "png")


@pytest.mark.parametrize("raw, fragment", [
    (b"GIF89a" + b"\x00" * 40, "not a JPEG, PNG or WebP"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "damaged or cut short"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "damaged or cut short"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "damaged or cut short"),
])
def test_image_header_refuses_what_is_not_a_whole_image_header(raw, fragment):
    from avatar_contracts.media import check_image_header

    with pytest.raises(BadMedia, match=fragment):
        check_image_header(raw, 10**7, "avatar_image")
