"""The verified model store under AVATAR_MODEL_DIR: check, fetch (resumable, atomic) and guard engine loads.

A file is fetched into `<name>.part` (resumed with an HTTP Range request after an interruption),
hashed on disk once complete, and renamed into place only when its size and sha256 are the
manifest's; a digest that differs is downloaded afresh once, then refused. Start-up checks an
engine's files (sizes, or sha256 with MODEL_VERIFY=sha256) before the engine reads them and
refuses a corrupt set with a message saying what to run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from gpu_service.models.manifest import (
    EngineManifest,
    FileRecord,
    LocalRecord,
    ManifestError,
    ModelFile,
    load_manifests,
    release_key,
)

log = logging.getLogger("gpu_service.models")

VerifyMode = Literal["size", "sha256"]
_CHUNK = 8 * 1024 * 1024
USER_AGENT = "avatar-stack-model-store/1"


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def human_size(n: Optional[int]) -> str:
    """1867929118 -> '1.74 GiB'."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


@dataclass(frozen=True)
class FileCheck:
    """The state of one file of an engine on disk, against what it should be."""

    engine: str
    name: str
    state: str
    """ok | size-ok | unverified | missing | partial | size-mismatch | sha256-mismatch | changed"""
    optional: bool
    detail: str = ""
    size: Optional[int] = None
    expected_size: Optional[int] = None
    expected_sha256: Optional[str] = None
    actual_sha256: Optional[str] = None

    @property
    def problem(self) -> bool:
        """The file makes the engine's weights unusable (a missing optional file does not)."""
        if self.state in ("ok", "size-ok", "unverified"):
            return False
        if self.state in ("missing", "partial"):
            return not self.optional
        return True

    @property
    def corrupt(self) -> bool:
        """Present but not what it should be (missing files are the engine's own message)."""
        return self.state in ("size-mismatch", "sha256-mismatch", "changed")

    def line(self) -> str:
        """`model.pth: sha256 mismatch (expected ..., got ...)` and the like."""
        return f"{self.name}: {self.state}" + (f" ({self.detail})" if self.detail else "")


class FetchError(RuntimeError):
    """A file could not be fetched; the message names the file and why."""


class LicenseNotAccepted(FetchError):
    """Files must be downloaded, but the licence they come under has not been accepted."""


class _Interrupted(Exception):
    """The transfer stopped early; the .part file is kept and resumed."""


class ModelStore:
    """The engines' weight files under one root, described by manifests and a local record."""

    def __init__(self, root: Path, manifests: dict[str, EngineManifest], subdirs: Optional[dict[str, str]] = None,
                 root_label: str = "$AVATAR_MODEL_DIR") -> None:
        self.root = Path(root)
        self.manifests = manifests
        self.subdirs = subdirs or {}
        self.root_label = root_label
        self.record = LocalRecord(self.root)

    @classmethod
    def from_settings(cls, settings) -> "ModelStore":
        """The store of AVATAR_MODEL_DIR with the manifests of MODEL_MANIFESTS_DIR (the shipped ones by default)."""
        manifests = load_manifests(settings.model_manifests_dir)
        subdirs = {}
        for name, manifest in manifests.items():
            if manifest.dir_setting:
                value = settings
                for part in manifest.dir_setting.split("."):
                    value = getattr(value, part)
                subdirs[name] = str(value)
        return cls(settings.avatar_model_dir, manifests, subdirs)

    # -- where -------------------------------------------------------------------------------
    def manifest(self, engine: str) -> EngineManifest:
        """The manifest of `engine`; ManifestError listing the known engines otherwise."""
        try:
            return self.manifests[engine]
        except KeyError:
            raise ManifestError(f"no manifest for engine {engine!r}; engines with manifests: "
                                f"{', '.join(sorted(self.manifests)) or 'none'}") from None

    def subdir(self, engine: str) -> str:
        """The engine's directory under the root (its setting, else the manifest's default)."""
        return self.subdirs.get(engine) or self.manifest(engine).dir

    def engine_dir(self, engine: str) -> Path:
        """Where the engine's files live."""
        return self.root / self.subdir(engine)

    def label(self, engine: str) -> str:
        """The engine's directory as messages name it: `$AVATAR_MODEL_DIR/xtts_v2`, never the path."""
        return f"{self.root_label}/{self.subdir(engine)}"

    # -- checking ----------------------------------------------------------------------------
    def expected(self, engine: str, f: ModelFile) -> tuple[Optional[int], Optional[str], Optional[FileRecord]]:
        """(size, sha256, record) the file must have: the release's, or what its engine rewrote it to."""
        rec = self.record.get(engine, f.name)
        if rec is not None and rec.replaces == release_key(f):
            return rec.size, rec.sha256, rec
        return f.size, f.sha256, rec

    def check_file(self, engine: str, f: ModelFile, mode: VerifyMode, trust_record: bool = False) -> FileCheck:
        """Check one file by size (mode `size`) or size and sha256; `trust_record` skips hashing a file
        whose size and modification time are those recorded when it was last hashed."""
        path = self.engine_dir(engine) / f.name
        size, sha, rec = self.expected(engine, f)
        base = dict(engine=engine, name=f.name, optional=f.optional, expected_size=size, expected_sha256=sha)
        if not path.is_file():
            part = path.with_name(path.name + ".part")
            if part.is_file():
                got = part.stat().st_size
                return FileCheck(state="partial", size=got, detail=f"{human_size(got)} of {human_size(size)} in "
                                 f"{f.name}.part; fetch resumes it", **base)
            return FileCheck(state="missing", **base)
        got_size = path.stat().st_size
        if size is not None and got_size != size:
            return FileCheck(state="size-mismatch", size=got_size,
                             detail=f"expected {size} bytes, got {got_size}", **base)
        if mode == "size":
            return FileCheck(state="size-ok" if size is not None else "unverified", size=got_size,
                             detail="" if size is not None else "the manifest gives no size", **base)
        if trust_record and rec is not None and rec.unchanged(path) and (sha is None or rec.sha256 == sha):
            digest = rec.sha256
        else:
            digest = sha256_of(path)
        base["actual_sha256"] = digest
        if sha is None:
            # No published digest: the best that can be said is whether it changed since it was fetched.
            if rec is not None and rec.sha256 != digest:
                return FileCheck(state="changed", size=got_size,
                                 detail=f"no published sha256; recorded {rec.sha256} when fetched, now {digest}", **base)
            return FileCheck(state="unverified", size=got_size, detail="no published sha256 to check against"
                             + ("; unchanged since fetched" if rec is not None else ""), **base)
        if digest != sha:
            return FileCheck(state="sha256-mismatch", size=got_size, detail=f"expected {sha}, got {digest}", **base)
        rewritten = rec is not None and rec.replaces == release_key(f)
        detail = "rewritten in place by its engine's first load; verified against that record" if rewritten else ""
        return FileCheck(state="ok", size=got_size, detail=detail, **base)

    def verify(self, engine: str, mode: VerifyMode = "sha256", trust_record: bool = False) -> list[FileCheck]:
        """Every file of the engine checked."""
        return [self.check_file(engine, f, mode, trust_record) for f in self.manifest(engine).files]

    def status(self, engine: str) -> list[FileCheck]:
        """Every file's state without reading any file through (for `list`): sizes, plus the record's word on digests."""
        out = []
        for f in self.manifest(engine).files:
            check = self.check_file(engine, f, "size")
            if check.state == "size-ok":
                size, sha, rec = self.expected(engine, f)
                path = self.engine_dir(engine) / f.name
                if rec is not None and rec.unchanged(path) and sha is not None and rec.sha256 == sha:
                    check = dataclasses.replace(check, state="ok", detail="sha256 checked when recorded")
                elif sha is None:
                    untouched = rec is not None and rec.unchanged(path)
                    check = dataclasses.replace(check, state="unverified", detail="no published sha256"
                                                + ("; untouched since fetched" if untouched else ""))
                else:
                    check = dataclasses.replace(check, detail="size matches; sha256 not checked (run verify)")
            out.append(check)
        return out

    def record_hashed(self, engine: str, checks: list[FileCheck]) -> None:
        """Remember the digests just computed for files that verified, so a restart need not hash them again."""
        updates = {}
        for c in checks:
            if c.state == "ok" and c.actual_sha256:
                path = self.engine_dir(engine) / c.name
                old = self.record.get(engine, c.name)
                if old is not None and old.unchanged(path) and old.sha256 == c.actual_sha256:
                    continue
                st = path.stat()
                updates[c.name] = FileRecord(st.st_size, c.actual_sha256, st.st_mtime_ns, "sha256",
                                             replaces=old.replaces if old else None)
        if updates:
            self.record.update(engine, self.subdir(engine), updates)

    # -- fetching ----------------------------------------------------------------------------
    def license_accepted(self, engine: str) -> bool:
        """True when the engine's weights come under no licence, or its acceptance variable is set to 1."""
        lic = self.manifest(engine).license
        return lic is None or os.environ.get(lic.accept_env, "").strip().lower() in ("1", "true", "yes")

    def fetch(self, engine: str, *, progress: Optional[bool] = None, retries: int = 3, retry_wait_s: float = 2.0,
              accept_license: bool = False, say: Callable[[str], None] = lambda line: print(line, flush=True),
              transport=None) -> list[FileCheck]:
        """Download every file of the engine that is not already here and verified; FetchError naming the
        file on failure. Interrupted transfers are resumed up to `retries` times (and by the next call)."""
        import httpx

        manifest = self.manifest(engine)
        target = self.engine_dir(engine)
        todo: list[ModelFile] = []
        done: list[FileCheck] = []
        for f in manifest.files:
            check = self.check_file(engine, f, "sha256", trust_record=True)
            if check.state in ("ok", "unverified"):
                say(f"{engine}: {f.name} already present ({check.state})")
                done.append(check)
                continue
            if check.corrupt:
                say(f"{engine}: {f.name} is on disk but {check.state} ({check.detail}); fetching it again")
            todo.append(f)
        self.record_hashed(engine, done)
        if not todo:
            return done
        if not (accept_license or self.license_accepted(engine)):
            lic = manifest.license
            assert lic is not None
            raise LicenseNotAccepted(f"{engine}: its weights come under the {lic.name} ({lic.url}); set "
                                     f"{lic.accept_env}=1 (or pass --accept-license) to accept it and fetch them")
        missing_url = [f.name for f in todo if not f.url]
        if missing_url:
            raise FetchError(f"{engine}: the manifest gives no URL for {', '.join(missing_url)}")
        target.mkdir(parents=True, exist_ok=True)
        timeout = httpx.Timeout(60.0, connect=15.0)
        with httpx.Client(follow_redirects=True, timeout=timeout, headers={"User-Agent": USER_AGENT},
                          transport=transport) as client:
            errors = []
            for f in todo:  # one file failing does not stop the others
                try:
                    done.append(self._fetch_file(engine, f, client, progress, retries, retry_wait_s, say))
                except FetchError as exc:
                    errors.append(str(exc))
        if errors:
            raise FetchError("; ".join(errors))
        return done

    def _fetch_file(self, engine: str, f: ModelFile, client, progress: Optional[bool], retries: int,
                    retry_wait_s: float, say: Callable[[str], None]) -> FileCheck:
        import httpx

        dest = self.engine_dir(engine) / f.name
        part = dest.with_name(dest.name + ".part")
        size, sha = f.size, f.sha256
        fresh_left = 1  # a wrong digest earns one fresh download, never more
        interruptions = 0
        started = time.monotonic()
        while True:
            try:
                self._download(f, part, client, progress)
                got = part.stat().st_size
                if size is not None and got < size:
                    raise _Interrupted(f"the transfer ended at {got} of {size} bytes")
            except (httpx.TransportError, _Interrupted) as exc:
                have = part.stat().st_size if part.exists() else 0
                interruptions += 1
                if interruptions > retries:
                    raise FetchError(f"{engine}: {f.name}: download interrupted ({type(exc).__name__}: {exc}) "
                                     f"after {have} of {size if size is not None else '?'} bytes; "
                                     f"{part.name} is kept and the next fetch resumes it") from None
                say(f"{engine}: {f.name}: interrupted at {have} bytes ({type(exc).__name__}); resuming "
                    f"({interruptions}/{retries})")
                time.sleep(retry_wait_s * interruptions)
                continue
            problem = None
            if size is not None and got != size:
                problem = f"size mismatch: expected {size} bytes, got {got}"
            digest = sha256_of(part)
            if problem is None and sha is not None and digest != sha:
                problem = f"sha256 mismatch: expected {sha}, got {digest}"
            if problem is None:
                break
            part.unlink(missing_ok=True)
            if fresh_left == 0:
                raise FetchError(f"{engine}: {f.name}: {problem} (downloaded twice from {f.url}); "
                                 "the file was removed, nothing was installed")
            fresh_left -= 1
            say(f"{engine}: {f.name}: {problem}; downloading it afresh once")
        with open(part, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(part, dest)  # atomic: the final name only ever holds a verified file
        _fsync_dir(dest.parent)
        st = dest.stat()
        self.record.update(engine, self.subdir(engine),
                           {f.name: FileRecord(st.st_size, digest, st.st_mtime_ns, "download")})
        state = "ok" if sha is not None else "unverified"
        say(f"{engine}: {f.name} fetched, {human_size(st.st_size)} in {time.monotonic() - started:.1f} s ({state})")
        log.info("model file fetched", extra={"engine": engine, "file": f.name, "bytes": st.st_size, "state": state})
        return FileCheck(engine=engine, name=f.name, state=state, optional=f.optional, size=st.st_size,
                         expected_size=size, expected_sha256=sha, actual_sha256=digest,
                         detail="" if sha is not None else "no published sha256 to check against")

    def _download(self, f: ModelFile, part: Path, client, progress: Optional[bool]) -> None:
        """Bring `part` up to the whole file, continuing from its current length when the server allows."""
        have = part.stat().st_size if part.exists() else 0
        if f.size is not None and have > f.size:
            part.unlink()
            have = 0
        if f.size is not None and have == f.size and have > 0:
            return  # complete already (an earlier run stopped before the rename)
        headers = {"Range": f"bytes={have}-"} if have else {}
        with client.stream("GET", f.url, headers=headers) as resp:
            if resp.status_code == 416 and have:
                total = _range_total(resp.headers.get("content-range"))
                if total == have:
                    return
                part.unlink()
                raise _Interrupted("the server refused the resume range; starting over")
            if resp.status_code == 206:
                start = _range_start(resp.headers.get("content-range"))
                if start != have:
                    part.unlink()
                    raise _Interrupted(f"the server resumed at byte {start}, not {have}; starting over")
                mode = "ab"
            elif resp.status_code == 200:
                mode, have = "wb", 0  # the server ignored the range: the whole file comes again
            elif resp.status_code in (408, 429) or resp.status_code >= 500:
                raise _Interrupted(f"HTTP {resp.status_code}")
            else:
                raise FetchError(f"{f.name}: HTTP {resp.status_code} from {f.url}")
            length = resp.headers.get("content-length")
            total = have + int(length) if length and length.isdigit() else f.size
            bar = _progress_bar(f.name, total, have, progress)
            try:
                with open(part, mode) as out:
                    for chunk in resp.iter_bytes(1024 * 1024):
                        out.write(chunk)
                        bar.update(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                bar.close()


def _range_start(header: Optional[str]) -> Optional[int]:
    """`bytes 100-999/1000` -> 100."""
    try:
        return int(header.split()[1].split("-")[0])  # type: ignore[union-attr]
    except (AttributeError, IndexError, ValueError):
        return None


def _range_total(header: Optional[str]) -> Optional[int]:
    """`bytes */1000` or `bytes 0-9/1000` -> 1000."""
    try:
        return int(header.rsplit("/", 1)[1])  # type: ignore[union-attr]
    except (AttributeError, IndexError, ValueError):
        return None


def _progress_bar(name: str, total: Optional[int], initial: int, progress: Optional[bool]):
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, initial=initial, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=not enabled, leave=False, mininterval=0.5)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- the start-up guard ----------------------------------------------------------------------------
class WeightsGuard:
    """Checks an engine's files before it loads them, and records a file the load rewrote in place."""

    def __init__(self, store: ModelStore, engine: str, mode: VerifyMode) -> None:
        self.store = store
        self.engine = engine
        self.mode = mode

    def before_load(self) -> dict[str, tuple[int, int]]:
        """Refuse (EngineUnavailable) a present file that is not what the manifest says; missing files are
        left to the engine's own message. Returns each file's (size, mtime) for after_load."""
        from gpu_service.errors import EngineUnavailable

        checks = self.store.verify(self.engine, self.mode)
        bad = [c for c in checks if c.corrupt]
        if bad:
            command = f"python -m gpu_service models fetch {self.engine}"
            for c in bad:
                log.error("model file failed verification; not loading the engine",
                          extra={"engine": self.engine, "file": c.name, "state": c.state, "detail": c.detail,
                                 "model_dir": str(self.store.engine_dir(self.engine)), "run": command})
            raise EngineUnavailable(
                f"{self.engine} weights in {self.store.label(self.engine)} failed verification: "
                + "; ".join(c.line() for c in bad)
                + f". Run `{command}` to replace them (MODEL_VERIFY=off loads weights of your own)")
        if self.mode == "sha256":
            self.store.record_hashed(self.engine, checks)
        snapshot = {}
        for f in self.store.manifest(self.engine).files:
            path = self.store.engine_dir(self.engine) / f.name
            if path.is_file():
                st = path.stat()
                snapshot[f.name] = (st.st_size, st.st_mtime_ns)
        return snapshot

    def after_load(self, snapshot: dict[str, tuple[int, int]]) -> None:
        """A verified file that the load changed (coqui-tts rewrites the released XTTS-v2 model.pth once)
        is hashed and recorded, so later start-ups verify it against what it became."""
        manifest = self.store.manifest(self.engine)
        updates = {}
        for name, (size, mtime) in snapshot.items():
            path = self.store.engine_dir(self.engine) / name
            try:
                st = path.stat()
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) == (size, mtime):
                continue
            updates[name] = FileRecord(st.st_size, sha256_of(path), st.st_mtime_ns, "sha256",
                                       replaces=release_key(manifest.file(name)))
            log.info("model file rewritten by its engine's load; recorded", extra={
                "engine": self.engine, "file": name, "bytes_before": size, "bytes_after": st.st_size})
        if updates:
            self.store.record.update(self.engine, self.store.subdir(self.engine), updates)
