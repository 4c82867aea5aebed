"""Avatar registry: presets from PRESET_AVATARS_DIR and uploads, with a byte-bounded LRU and an npz disk cache."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from avatar_contracts.media import Background
from gpu_service.errors import BadMedia, NotFound, ValidationFailed
from gpu_service.talking_head.encoding import Encoding, check_image, decode_image, encode_image, image_key
from gpu_service.talking_head.protocol import AvatarRecord

log = logging.getLogger(__name__)

AVATAR_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def check_avatar_id(avatar_id: str) -> str:
    """The id itself, or a 422 when it is not [A-Za-z0-9_-]{1,64} (so it can never name a path)."""
    if not isinstance(avatar_id, str) or not AVATAR_ID.match(avatar_id):
        raise ValidationFailed(f"avatar_id {avatar_id!r} is invalid; ids are 1-64 characters of A-Z, a-z, 0-9, _ and -")
    return avatar_id


class AvatarStore:
    """Encodes each distinct image once; keeps encodings in memory within a byte budget and on disk by hash."""

    def __init__(self, cache_dir: Path, cache_bytes: int, max_image_bytes: int, max_image_pixels: int = 40_000_000) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self._records: dict[str, AvatarRecord] = {}
        self._memory: "OrderedDict[str, Encoding]" = OrderedDict()
        self._lock = threading.RLock()
        self._index = self.cache_dir / "uploads.json"
        self._load_index()

    # -- persistence of uploaded ids ---------------------------------------------------------
    def _load_index(self) -> None:
        try:
            entries = json.loads(self._index.read_text())
        except (OSError, ValueError):
            return
        for entry in entries:
            rec = AvatarRecord(**entry)
            if AVATAR_ID.match(rec.avatar_id) and self._npz(rec.key).exists():
                self._records[rec.avatar_id] = rec

    def _save_index(self) -> None:
        uploads = [vars(r) for r in self._records.values() if not r.preset]
        tmp = self._index.with_suffix(".tmp")
        tmp.write_text(json.dumps(uploads))
        tmp.replace(self._index)

    def _npz(self, key: str) -> Path:
        return self.cache_dir / f"{key}.npz"

    # -- memory cache ------------------------------------------------------------------------
    def _remember(self, key: str, enc: Encoding) -> None:
        with self._lock:
            self._memory[key] = enc
            self._memory.move_to_end(key)
            total = sum(e.nbytes for e in self._memory.values())
            while total > self.cache_bytes and len(self._memory) > 1:
                _, old = self._memory.popitem(last=False)
                total -= old.nbytes

    def memory_bytes(self) -> int:
        """Bytes held by the in-memory encodings."""
        with self._lock:
            return sum(e.nbytes for e in self._memory.values())

    # -- operations --------------------------------------------------------------------------
    def encode_bytes(self, raw: bytes, *, face_index: Optional[int] = None, background: Optional[Background] = None,
                     field: str = "image") -> tuple[str, Encoding, float, bool]:
        """(key, encoding, encode ms, from cache) for image bytes, the face chosen (None: the largest) and the
        background of a transparent image (None: the default); disk and memory caches first."""
        check_image(raw, self.max_image_bytes, self.max_image_pixels, field)
        key = image_key(raw, face_index, background)
        with self._lock:
            enc = self._memory.get(key)
        if enc is not None:
            return key, enc, 0.0, True
        enc = Encoding.load(self._npz(key))
        if enc is not None:
            self._remember(key, enc)
            return key, enc, 0.0, True
        image = decode_image(raw, self.max_image_bytes, field, self.max_image_pixels, background)
        started = time.perf_counter()
        enc = encode_image(image, face_index=face_index)
        ms = (time.perf_counter() - started) * 1000
        enc.save(self._npz(key))
        self._remember(key, enc)
        return key, enc, ms, False

    def add(self, raw: bytes, *, face_index: Optional[int] = None, background: Optional[Background] = None,
            avatar_id: Optional[str] = None, preset: bool = False, field: str = "image") -> AvatarRecord:
        """Register an image as an avatar (id from its key, unless given) and return its record.

        The key holds the image's hash, the background of a transparent image and the face chosen,
        so each face and each background is its own avatar.
        """
        key, enc, ms, cached = self.encode_bytes(raw, face_index=face_index, background=background, field=field)
        face = f"_f{face_index}" if face_index else ""  # one image, one avatar per face (0, the default, is the largest)
        avatar_id = check_avatar_id(avatar_id) if avatar_id else "img_" + key[:20] + face
        w, h = enc.frame_size
        rec = AvatarRecord(avatar_id, key, list(enc.face_box), [w, h], preset, ms, cached)
        with self._lock:
            self._records[avatar_id] = rec
            if not preset:
                self._save_index()
        log.info("avatar registered", extra={"avatar_id": avatar_id, "preset": preset, "encode_ms": round(ms, 1), "cached": cached})
        return rec

    def load_presets(self, root: Path) -> list[str]:
        """Register every subfolder of `root` (id = folder name); a bad preset is logged and skipped."""
        loaded: list[str] = []
        root = Path(root)
        if not root.is_dir():
            log.info("no preset avatars", extra={"dir": str(root)})
            return loaded
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if not AVATAR_ID.match(folder.name):
                log.warning("preset skipped: bad folder name", extra={"folder": folder.name})
                continue
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
            if not images:
                log.warning("preset skipped: no image", extra={"avatar_id": folder.name})
                continue
            try:
                self.add(images[0].read_bytes(), avatar_id=folder.name, preset=True)
                loaded.append(folder.name)
            except (BadMedia, ValidationFailed, OSError) as exc:
                log.warning("preset skipped", extra={"avatar_id": folder.name, "why": getattr(exc, "message", str(exc))})
        return loaded

    def record(self, avatar_id: str) -> AvatarRecord:
        """The record of a known avatar, or 404."""
        check_avatar_id(avatar_id)
        with self._lock:
            rec = self._records.get(avatar_id)
        if rec is None:
            raise NotFound(f"unknown avatar_id {avatar_id!r}; GET /avatars lists the known ones")
        return rec

    def get(self, avatar_id: str) -> Encoding:
        """The encoding of a known avatar (memory, else disk)."""
        rec = self.record(avatar_id)
        with self._lock:
            enc = self._memory.get(rec.key)
            if enc is not None:
                self._memory.move_to_end(rec.key)
                return enc
        enc = Encoding.load(self._npz(rec.key))
        if enc is None:
            raise NotFound(f"avatar {avatar_id!r} is no longer cached; upload its image again")
        self._remember(rec.key, enc)
        return enc

    def list(self) -> list[AvatarRecord]:
        """Every registered avatar, presets first."""
        with self._lock:
            return sorted(self._records.values(), key=lambda r: (not r.preset, r.avatar_id))

    def delete(self, avatar_id: str) -> None:
        """Forget an uploaded avatar and its cached encoding; presets cannot be deleted."""
        rec = self.record(avatar_id)
        if rec.preset:
            raise ValidationFailed(f"avatar {avatar_id!r} is a preset; remove its folder from PRESET_AVATARS_DIR instead")
        with self._lock:
            del self._records[avatar_id]
            if not any(r.key == rec.key for r in self._records.values()):
                self._memory.pop(rec.key, None)
                self._npz(rec.key).unlink(missing_ok=True)
            self._save_index()
