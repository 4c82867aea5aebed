"""What an engine's weights are (the shipped manifests) and what is installed (AVATAR_MODEL_DIR/manifest.json).

Shipped manifests (`gpu_service/models/manifests/<engine>.json`, or MODEL_MANIFESTS_DIR) describe
each optional engine's release files: name, size, sha256 (null where no published digest is
known: such a file is reported "unverified") and the URL to fetch it from. The local record in
AVATAR_MODEL_DIR/manifest.json says what the store installed or checked, so a restart need not
hash gigabytes again, and remembers a file an engine rewrote in place on its first load (coqui-tts
turns the released XTTS-v2 model.pth into a plain-dict checkpoint), which then verifies against
the rewritten digest instead of the release's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

PACKAGE_MANIFESTS = Path(__file__).resolve().parent / "manifests"
LOCAL_MANIFEST = "manifest.json"
LOCAL_FORMAT = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ModelFile:
    """One file of an engine's weights as its release publishes it."""

    name: str
    size: Optional[int]
    sha256: Optional[str]
    url: Optional[str]
    optional: bool = False
    """The engine runs without it (XTTS-v2's built-in speakers); fetched and verified all the same."""
    purpose: str = ""


def release_key(f: ModelFile) -> str:
    """`<size>:<sha256>` of a release file, what a rewritten file's record says it replaced."""
    return f"{f.size}:{f.sha256}"


@dataclass(frozen=True)
class License:
    """A licence the weights come under, accepted by setting `accept_env=1` before fetching."""

    name: str
    url: str
    accept_env: str


@dataclass(frozen=True)
class EngineManifest:
    """An engine's weight files and where they live under AVATAR_MODEL_DIR."""

    engine: str
    capability: str
    title: str
    dir: str
    """Default subdirectory of AVATAR_MODEL_DIR."""
    files: tuple[ModelFile, ...]
    dir_setting: Optional[str] = None
    """Settings attribute (dotted) that overrides `dir`, e.g. `xtts.model_subdir` (XTTS__MODEL_SUBDIR)."""
    license: Optional[License] = None
    source: str = ""
    path: Optional[Path] = None

    def file(self, name: str) -> ModelFile:
        """The file called `name`."""
        return next(f for f in self.files if f.name == name)


def _field(data: dict, key: str, kind: type | tuple[type, ...], where: str, required: bool = True) -> Any:
    if key not in data:
        if required:
            raise ManifestError(f"{where}: '{key}' is missing")
        return None
    value = data[key]
    if value is not None and not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ManifestError(f"{where}: '{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def parse_manifest(data: Any, path: Path) -> EngineManifest:
    """An EngineManifest from its JSON; ManifestError naming the file and field when it is malformed."""
    where = path.name
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: not a JSON object")
    engine = _field(data, "engine", str, where)
    files_data = _field(data, "files", list, where)
    if not files_data:
        raise ManifestError(f"{where}: 'files' is empty")
    files = []
    for i, item in enumerate(files_data):
        at = f"{where}: files[{i}]"
        if not isinstance(item, dict):
            raise ManifestError(f"{at}: not an object")
        unknown = set(item) - {"name", "size", "sha256", "url", "optional", "purpose"}
        if unknown:
            raise ManifestError(f"{at}: unknown keys {sorted(unknown)}")
        name = _field(item, "name", str, at)
        if not _NAME.match(name):
            raise ManifestError(f"{at}: 'name' {name!r} must be a plain file name")
        size = _field(item, "size", int, at)
        if size is not None and size < 0:
            raise ManifestError(f"{at}: 'size' must be >= 0")
        sha = _field(item, "sha256", str, at)
        if sha is not None and not _SHA256.match(sha):
            raise ManifestError(f"{at}: 'sha256' must be 64 lowercase hex digits or null, got {sha!r}")
        url = _field(item, "url", str, at)
        if url is not None and not re.match(r"^https?://", url):
            raise ManifestError(f"{at}: 'url' must be http(s), got {url!r}")
        optional = item.get("optional", False)
        if not isinstance(optional, bool):
            raise ManifestError(f"{at}: 'optional' must be true or false, got {optional!r}")
        files.append(ModelFile(name, size, sha, url, optional, str(item.get("purpose", ""))))
    if len({f.name for f in files}) != len(files):
        raise ManifestError(f"{where}: a file name appears twice")
    lic = data.get("license")
    license_ = None
    if lic is not None:
        if not isinstance(lic, dict):
            raise ManifestError(f"{where}: 'license' must be an object")
        license_ = License(_field(lic, "name", str, f"{where}: license"), _field(lic, "url", str, f"{where}: license"),
                           _field(lic, "accept_env", str, f"{where}: license"))
    subdir = _field(data, "dir", str, where)
    if not _NAME.match(subdir):
        raise ManifestError(f"{where}: 'dir' {subdir!r} must be a plain directory name")
    capability = _field(data, "capability", str, where)
    if capability not in ("tts", "video", "lipsync"):
        raise ManifestError(f"{where}: 'capability' must be tts, video or lipsync, got {capability!r}")
    return EngineManifest(
        engine=engine, capability=capability, title=_field(data, "title", str, where),
        dir=subdir, files=tuple(files), dir_setting=_field(data, "dir_setting", str, where, required=False),
        license=license_, source=_field(data, "source", str, where, required=False) or "", path=path,
    )


def load_manifests(directory: Path = PACKAGE_MANIFESTS) -> dict[str, EngineManifest]:
    """Every `<engine>.json` in `directory`, by engine name."""
    out: dict[str, EngineManifest] = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path.name}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        manifest = parse_manifest(data, path)
        if manifest.engine in out:
            raise ManifestError(f"{path.name}: engine {manifest.engine!r} is already described by "
                                f"{out[manifest.engine].path.name}")  # type: ignore[union-attr]
        out[manifest.engine] = manifest
    return out


# -- the local record ---------------------------------------------------------------------------
@dataclass
class FileRecord:
    """What the store last saw of one installed file."""

    size: int
    sha256: str
    mtime_ns: int
    checked: str
    """How the digest was obtained: `download` (hashed while fetched) or `sha256` (hashed on disk)."""
    replaces: Optional[str] = None
    """`release_key` of the release file this one was rewritten from by its engine's first load; while the
    manifest still describes that release, the file verifies against this record instead."""
    recorded_at: float = field(default_factory=time.time)

    def unchanged(self, path: Path) -> bool:
        """The file still has the size and modification time it had when recorded (no need to hash it again)."""
        try:
            st = path.stat()
        except OSError:
            return False
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


class LocalRecord:
    """AVATAR_MODEL_DIR/manifest.json, read and written whole under a lock file (atomic replace)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCAL_MANIFEST

    def read(self) -> dict[str, dict[str, FileRecord]]:
        """engine -> file name -> record; an absent or unreadable file is an empty record."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        if not isinstance(data, dict) or data.get("format") != LOCAL_FORMAT:
            return {}
        out: dict[str, dict[str, FileRecord]] = {}
        for engine, entry in (data.get("engines") or {}).items():
            files = {}
            for name, rec in ((entry or {}).get("files") or {}).items():
                with contextlib.suppress(TypeError, KeyError):
                    files[name] = FileRecord(size=int(rec["size"]), sha256=str(rec["sha256"]),
                                             mtime_ns=int(rec["mtime_ns"]), checked=str(rec["checked"]),
                                             replaces=rec.get("replaces"), recorded_at=float(rec.get("recorded_at", 0)))
            out[engine] = files
        return out

    def get(self, engine: str, name: str) -> Optional[FileRecord]:
        """The record of one file, if any."""
        return self.read().get(engine, {}).get(name)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / (LOCAL_MANIFEST + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the initContainer and the service may share the volume
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update(self, engine: str, subdir: str, records: dict[str, Optional[FileRecord]]) -> None:
        """Set (or with None, drop) the records of some files of `engine`, keeping everything else."""
        with self._locked():
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict) or data.get("format") != LOCAL_FORMAT:
                    data = {}
            except (OSError, json.JSONDecodeError):
                data = {}
            engines = data.setdefault("engines", {})
            data["format"] = LOCAL_FORMAT
            entry = engines.setdefault(engine, {})
            entry["dir"] = subdir
            files = entry.setdefault("files", {})
            for name, rec in records.items():
                if rec is None:
                    files.pop(name, None)
                else:
                    files[name] = {"size": rec.size, "sha256": rec.sha256, "mtime_ns": rec.mtime_ns,
                                   "checked": rec.checked, "replaces": rec.replaces,
                                   "recorded_at": round(rec.recorded_at, 3)}
            tmp = self.path.with_name(f".{LOCAL_MANIFEST}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
