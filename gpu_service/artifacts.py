"""Generated media kept on disk for a while, within a size and age budget, served by id."""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from pathlib import Path

from avatar_contracts.checks import parse_url
from gpu_service.errors import NotFound, ValidationFailed

_ID = re.compile(r"^[0-9a-f]{32}\.(wav|mp4|png|json|vtt)$")
_AUDIO_URL_PATH = re.compile(r"^/(?:.*/)?artifacts/([0-9a-f]{32}\.wav)$")
MEDIA_TYPES = {"wav": "audio/wav", "mp4": "video/mp4", "png": "image/png", "json": "application/json", "vtt": "text/vtt"}


class ArtifactStore:
    """A flat folder of random-named files; the oldest go first when over budget or too old."""

    def __init__(self, root: Path, max_bytes: int, ttl_s: float) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._lock = threading.Lock()

    def put(self, data: bytes, ext: str) -> str:
        """Store bytes and return the artifact id (`<hex>.<ext>`)."""
        art_id = f"{secrets.token_hex(16)}.{ext}"
        tmp = self.root / f".{art_id}.tmp"
        try:
            tmp.write_bytes(data)
        except FileNotFoundError:  # the folder was removed under a running service (a tmp cleaner): make it again
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        os.replace(tmp, self.root / art_id)
        self.prune()
        return art_id

    def path(self, art_id: str) -> Path:
        """The file of a live artifact; NotFound for ids that are malformed, expired or removed."""
        if not _ID.match(art_id):
            raise NotFound(f"no artifact {art_id!r}")
        path = self.root / art_id
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            raise NotFound(f"artifact {art_id!r} does not exist or has expired") from None
        if age > self.ttl_s:
            path.unlink(missing_ok=True)
            raise NotFound(f"artifact {art_id!r} has expired")
        return path

    def audio_url_path(self, url: str) -> Path:
        """The file behind an audio_url this service's /tts returned; any other URL is refused, never fetched."""
        match = _AUDIO_URL_PATH.match(parse_url(url, "audio_url").path)
        if not match:
            raise ValidationFailed("audio_url must be an audio_url returned by this service's /tts (…/artifacts/<id>.wav)")
        try:
            return self.path(match.group(1))
        except NotFound as exc:
            raise NotFound(f"audio_url: {exc.message}") from None

    def read(self, art_id: str) -> bytes:
        """The bytes of a live artifact."""
        return self.path(art_id).read_bytes()

    def prune(self) -> int:
        """Remove expired artifacts, then the oldest until the total fits the budget; return how many went."""
        removed = 0
        with self._lock:
            now = time.time()
            entries = []
            for path in self.root.iterdir():
                if not _ID.match(path.name):
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if now - st.st_mtime > self.ttl_s:
                    path.unlink(missing_ok=True)
                    removed += 1
                else:
                    entries.append((st.st_mtime, st.st_size, path))
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):
                if total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size
                removed += 1
        return removed
