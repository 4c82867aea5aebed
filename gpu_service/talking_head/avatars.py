"""Avatar registry: presets from PRESET_AVATARS_DIR and uploads, a byte-bounded LRU per device and an npz disk cache.

The records and the disk cache are one per service; each device (each replica of the talking
head) keeps its own LRU of the encodings it used last, so a device's figures say which
portraits are warm there, and an encoding leaving a device's LRU drops what its renderer
prepared on that device. An encoding another device holds is shared, not read again from disk.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

from gpu_service.engine import CacheStats
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


DEFAULT_DEVICE = "cpu"
"""The device of a store used without naming one (a single-device service names its own)."""


class EncodingCache:
    """One device's encodings in memory: within a byte budget, the least recently used leave first.

    Not locked itself: the AvatarStore that owns it holds its lock around every call.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: "OrderedDict[str, Encoding]" = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def keys(self) -> list[str]:
        """Keys from the least to the most recently used."""
        return list(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes of the encodings held."""
        return sum(e.nbytes for e in self._items.values())

    def get(self, key: str) -> Optional[Encoding]:
        """The encoding of `key`, now the most recently used, or None (counted as a hit or a miss)."""
        enc = self._items.get(key)
        if enc is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return enc

    def peek(self, key: str) -> Optional[Encoding]:
        """The encoding of `key` without touching its place or the counters."""
        return self._items.get(key)

    def put(self, key: str, enc: Encoding) -> list[Encoding]:
        """Hold `enc` as the most recently used; returns the encodings evicted past the budget (the newest always stays)."""
        self._items[key] = enc
        self._items.move_to_end(key)
        evicted = []
        total = self.nbytes
        while total > self.budget and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            total -= old.nbytes
            evicted.append(old)
        self.evictions += len(evicted)
        return evicted

    def pop(self, key: str) -> Optional[Encoding]:
        """Forget `key`; its encoding, if it was held."""
        return self._items.pop(key, None)


class AvatarStore:
    """Encodes each distinct image once; keeps encodings on disk by hash and in memory per device within a byte budget."""

    def __init__(self, cache_dir: Path, cache_bytes: int, max_image_bytes: int, max_image_pixels: int = 40_000_000) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes
        """The memory budget of each device's LRU."""
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self._records: dict[str, AvatarRecord] = {}
        self._memory: dict[str, EncodingCache] = {}
        self._evicted: dict[str, list[Callable[[Encoding], None]]] = {}
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

    # -- memory cache, per device -------------------------------------------------------------
    def device_cache(self, device: str) -> EncodingCache:
        """The LRU of `device` (made on first use)."""
        with self._lock:
            cache = self._memory.get(device)
            if cache is None:
                cache = self._memory[device] = EncodingCache(self.cache_bytes)
            return cache

    def on_evict(self, device: str, listener: Callable[[Encoding], None]) -> None:
        """Call `listener(encoding)` whenever an encoding leaves `device`'s LRU (evicted or deleted)."""
        with self._lock:
            self._evicted.setdefault(device, []).append(listener)

    def _notify(self, device: str, gone: list[Encoding]) -> None:
        for enc in gone:
            for listener in self._evicted.get(device, ()):
                listener(enc)

    def _remember(self, key: str, enc: Encoding, device: str) -> None:
        with self._lock:
            gone = self.device_cache(device).put(key, enc)
            self._notify(device, gone)

    def _recall(self, key: str, device: str) -> Optional[Encoding]:
        """The encoding of `key` from `device`'s LRU, else from another device's (shared, not copied), else None."""
        with self._lock:
            enc = self.device_cache(device).get(key)
            if enc is not None:
                return enc
            for other in self._memory.values():
                enc = other.peek(key)
                if enc is not None:
                    self._remember(key, enc, device)
                    return enc
        return None

    def memory_bytes(self, device: Optional[str] = None) -> int:
        """Bytes of the encodings in `device`'s LRU, or of every distinct encoding in memory."""
        with self._lock:
            if device is not None:
                return self.device_cache(device).nbytes
            held = {id(e): e for cache in self._memory.values() for e in (cache.peek(k) for k in cache.keys())}
            return sum(e.nbytes for e in held.values())

    def cache_stats(self, device: str) -> CacheStats:
        """How many avatars `device` holds in memory, and its hits and misses."""
        with self._lock:
            cache = self.device_cache(device)
            return CacheStats(size=len(cache), hits=cache.hits, misses=cache.misses)

    def is_cached(self, avatar_id: str, device: str) -> bool:
        """Whether `device`'s LRU holds the avatar's encoding now (placement prefers such a device)."""
        with self._lock:
            rec = self._records.get(avatar_id)
            return rec is not None and rec.key in self.device_cache(device)

    # -- operations --------------------------------------------------------------------------
    def encode_bytes(self, raw: bytes, *, face_index: Optional[int] = None, background: Optional[Background] = None,
                     field: str = "image", device: str = DEFAULT_DEVICE) -> tuple[str, Encoding, float, bool]:
        """(key, encoding, encode ms, from cache) for image bytes, the face chosen (None: the largest) and the
        background of a transparent image (None: the default); memory and disk caches first.

        The encoding is remembered in `device`'s LRU.
        """
        check_image(raw, self.max_image_bytes, self.max_image_pixels, field)
        key = image_key(raw, face_index, background)
        enc = self._recall(key, device)
        if enc is not None:
            return key, enc, 0.0, True
        enc = Encoding.load(self._npz(key))
        if enc is not None:
            self._remember(key, enc, device)
            return key, enc, 0.0, True
        image = decode_image(raw, self.max_image_bytes, field, self.max_image_pixels, background)
        started = time.perf_counter()
        enc = encode_image(image, face_index=face_index)
        ms = (time.perf_counter() - started) * 1000
        enc.save(self._npz(key))
        self._remember(key, enc, device)
        return key, enc, ms, False

    def add(self, raw: bytes, *, face_index: Optional[int] = None, background: Optional[Background] = None,
            avatar_id: Optional[str] = None, preset: bool = False, field: str = "image",
            device: str = DEFAULT_DEVICE) -> AvatarRecord:
        """Register an image as an avatar (id from its key, unless given), warm on `device`, and return its record.

        The key holds the image's hash, the background of a transparent image and the face chosen,
        so each face and each background is its own avatar.
        """
        key, enc, ms, cached = self.encode_bytes(raw, face_index=face_index, background=background, field=field,
                                                 device=device)
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

    def load_presets(self, root: Path, device: str = DEFAULT_DEVICE) -> list[str]:
        """Register every subfolder of `root` (id = folder name), warm in `device`'s LRU; a bad preset is logged and skipped."""
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
                self.add(images[0].read_bytes(), avatar_id=folder.name, preset=True, device=device)
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

    def get(self, avatar_id: str, device: str = DEFAULT_DEVICE) -> Encoding:
        """The encoding of a known avatar for `device` (its memory, another device's, else disk)."""
        rec = self.record(avatar_id)
        enc = self._recall(rec.key, device)
        if enc is not None:
            return enc
        enc = Encoding.load(self._npz(rec.key))
        if enc is None:
            raise NotFound(f"avatar {avatar_id!r} is no longer cached; upload its image again")
        self._remember(rec.key, enc, device)
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
                for device, cache in self._memory.items():
                    enc = cache.pop(rec.key)
                    self._notify(device, [enc] if enc is not None else [])
                self._npz(rec.key).unlink(missing_ok=True)
            self._save_index()
