"""Where a job's files are kept: a local folder (default) or S3-compatible object storage.

A job's files are its outputs (video.mp4, captions.vtt, timing.json, thumbnail.jpg) and, while it
runs, its finished chunks (chunk_NNNN.wav/.mp4 and, written last, chunk_NNNN.json), which a retried
or taken-over attempt resumes from. Both live in the store, so with S3 any runtime can resume any
job and serve any output, and runtimes need no shared disk.

ffmpeg works on files, so an attempt always works in a local folder (`JobFiles.dir`):
- `LocalStore`: that folder is the job's folder in DATA_DIR/jobs, exactly as before the store existed.
- `S3Store`: a fresh folder under DATA_DIR/scratch for each attempt, removed when the attempt ends.
  Every chunk is uploaded as it finishes (its .json last, so a .json in the bucket means the chunk is
  whole); a resumed attempt downloads the finished chunks it needs for the final mux. Nothing the
  job needs stays only on one runtime's disk.

Serving: a local output is sent as a file; an S3 output is answered with a redirect to a presigned
URL (S3_SERVE=redirect, the default) or read from the bucket and streamed through (S3_SERVE=stream).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator, Optional

from runtime import media
from runtime.errors import StoreUnavailable
from runtime.settings import Settings

log = logging.getLogger("runtime.storage")

CONTENT_TYPES = {".mp4": "video/mp4", ".vtt": "text/vtt", ".json": "application/json", ".jpg": "image/jpeg",
                 ".wav": "audio/wav"}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_JOB = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def content_type(name: str) -> str:
    """The media type a file is stored and served with."""
    return CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream")


def _checked(job_id: str, name: Optional[str] = None) -> None:
    # ids and names come from the runtime itself; the check keeps a slip from ever reaching outside the job
    if not _JOB.match(job_id) or (name is not None and not _NAME.match(name)):
        raise ValueError(f"not a job file: {job_id!r}/{name!r}")


class JobFiles(ABC):
    """One attempt's view of one job's files: a local folder to work in, backed by the store."""

    def __init__(self, job_id: str, folder: Path) -> None:
        self.job_id = job_id
        self.dir = folder
        """The local folder the attempt reads and writes (ffmpeg needs files)."""

    def path(self, name: str) -> Path:
        """Where `name` is (or goes) in the local folder."""
        _checked(self.job_id, name)
        return self.dir / name

    @abstractmethod
    def has(self, name: str) -> bool:
        """Whether the store holds `name` for this job."""

    @abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Write `name` (atomically) in the local folder and keep it in the store."""

    @abstractmethod
    def save(self, name: str) -> None:
        """Keep in the store the file `name` already written in the local folder."""

    @abstractmethod
    def fetch(self, name: str) -> Path:
        """`name` in the local folder, brought from the store when this attempt did not write it."""

    def read(self, name: str) -> bytes:
        """The bytes of `name`."""
        return self.fetch(name).read_bytes()

    def close(self) -> None:
        """End of the attempt: drop what only served as a local copy."""


class OutputStore(ABC):
    """A job's files by job id and file name, whichever runtime asks."""

    @abstractmethod
    def open_job(self, job_id: str) -> JobFiles:
        """The files of one attempt at the job (close it when the attempt ends)."""

    @abstractmethod
    def exists(self, job_id: str, name: str) -> bool:
        """Whether the store holds `name` for the job."""

    @abstractmethod
    def names(self, job_id: str) -> list[str]:
        """Every file the store holds for the job."""

    @abstractmethod
    def delete(self, job_id: str, names: list[str]) -> None:
        """Remove some of the job's files."""

    @abstractmethod
    def remove(self, job_id: str) -> None:
        """Remove all of the job's files (expired or abandoned)."""

    @abstractmethod
    def check(self) -> None:
        """Raise StoreUnavailable (naming the settings to fix) when the store cannot be used."""

    @abstractmethod
    def describe(self) -> str:
        """Where the files go, for logs."""

    def local_path(self, job_id: str, name: str) -> Optional[Path]:
        """The file on this machine's disk when the store is a local folder (sent as a file), else None."""
        return None

    def presigned_url(self, job_id: str, name: str) -> Optional[str]:
        """A URL the client can fetch `name` from directly, or None when the runtime sends the bytes itself."""
        return None

    @abstractmethod
    def stream(self, job_id: str, name: str) -> tuple[Iterator[bytes], int]:
        """The bytes of `name` in pieces, and its size."""


# -- a local folder -----------------------------------------------------------------------------


class _LocalFiles(JobFiles):
    def has(self, name: str) -> bool:
        return self.path(name).exists()

    def put(self, name: str, data: bytes) -> None:
        media.write_atomic(self.path(name), data)

    def save(self, name: str) -> None:
        if not self.path(name).exists():  # the folder is the store: there is nothing to copy, only to check
            raise FileNotFoundError(f"{name} was not written")

    def fetch(self, name: str) -> Path:
        return self.path(name)


class LocalStore(OutputStore):
    """Each job's files in DATA_DIR/jobs/<job id>/: one runtime, or several sharing one disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _dir(self, job_id: str) -> Path:
        _checked(job_id)
        return self.root / job_id

    def open_job(self, job_id: str) -> JobFiles:
        folder = self._dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        return _LocalFiles(job_id, folder)

    def exists(self, job_id: str, name: str) -> bool:
        _checked(job_id, name)
        return (self._dir(job_id) / name).exists()

    def names(self, job_id: str) -> list[str]:
        folder = self._dir(job_id)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def delete(self, job_id: str, names: list[str]) -> None:
        folder = self._dir(job_id)
        for name in names:
            (folder / name).unlink(missing_ok=True)

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self._dir(job_id), ignore_errors=True)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"DATA_DIR: cannot create the outputs folder: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise StoreUnavailable("DATA_DIR: the outputs folder is not writable by the runtime")

    def describe(self) -> str:
        return f"local:{self.root}"

    def local_path(self, job_id: str, name: str) -> Optional[Path]:
        _checked(job_id, name)
        return self._dir(job_id) / name

    def stream(self, job_id: str, name: str) -> tuple[Iterator[bytes], int]:
        path = self.local_path(job_id, name)
        size = path.stat().st_size

        def pieces() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                while piece := fh.read(1 << 16):
                    yield piece

        return pieces(), size


# -- S3-compatible object storage ---------------------------------------------------------------


class _S3Files(JobFiles):
    def __init__(self, store: "S3Store", job_id: str, folder: Path, stored: set[str]) -> None:
        super().__init__(job_id, folder)
        self.store = store
        self.stored = stored
        """What the bucket holds for the job: listed once per attempt, kept up to date by our own writes."""

    def has(self, name: str) -> bool:
        _checked(self.job_id, name)
        return name in self.stored

    def put(self, name: str, data: bytes) -> None:
        media.write_atomic(self.path(name), data)
        self.store._call("PutObject", self.store.client.put_object, Bucket=self.store.bucket,
                         Key=self.store.key(self.job_id, name), Body=data, ContentType=content_type(name))
        self.stored.add(name)

    def save(self, name: str) -> None:
        self.store._call("upload", self.store.client.upload_file, str(self.path(name)), self.store.bucket,
                         self.store.key(self.job_id, name), ExtraArgs={"ContentType": content_type(name)})
        self.stored.add(name)

    def fetch(self, name: str) -> Path:
        path = self.path(name)
        if not path.exists():
            tmp = path.with_name(f".{name}.{os.getpid()}.part")
            self.store._call("download", self.store.client.download_file, self.store.bucket,
                             self.store.key(self.job_id, name), str(tmp))
            os.replace(tmp, path)
        return path

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class S3Store(OutputStore):
    """Each job's files as objects <S3_PREFIX><job id>/<name> in S3_BUCKET."""

    def __init__(self, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        assert settings.s3_bucket  # the settings refuse OUTPUT_STORE=s3 without it
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.lstrip("/")
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"
        self.serve = settings.s3_serve
        self.expiry_s = settings.s3_presign_expiry_s
        self.endpoint = settings.s3_endpoint_url
        self.scratch = settings.scratch_dir
        config = Config(signature_version="s3v4", s3={"addressing_style": settings.s3_addressing_style},
                        retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                        max_pool_connections=32)
        session = boto3.session.Session(region_name=settings.s3_region)
        self.client = session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
        # presigned URLs are signed for the host the client will ask; no request is sent through this one
        self.signer = self.client if not settings.s3_public_endpoint_url else session.client(
            "s3", endpoint_url=settings.s3_public_endpoint_url, config=config)
        self._sweep_scratch(settings.job_time_limit_s + 60)

    def key(self, job_id: str, name: str = "") -> str:
        """The object key of a job's file (or, without a name, the job's key prefix)."""
        _checked(job_id, name or None)
        return f"{self.prefix}{job_id}/{name}"

    def _failure(self, what: str, exc: Exception) -> StoreUnavailable:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            exc = f"{err.get('Code', '?')} {err.get('Message', '')}".rstrip()
        return StoreUnavailable(f"object storage: {what} in bucket {self.bucket!r} failed: {exc}")

    def _call(self, what: str, fn, *args, **kwargs):
        """One S3 call; any failure to reach or use the bucket is StoreUnavailable, which a job retries."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._failure(what, exc) from None

    def _sweep_scratch(self, older_than_s: float) -> None:
        """Remove working folders that attempts of dead processes left (none can be older than a job's time limit)."""
        if not self.scratch.is_dir():
            return
        cutoff = time.time() - older_than_s
        for entry in self.scratch.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)

    def open_job(self, job_id: str) -> JobFiles:
        stored = set(self.names(job_id))
        self.scratch.mkdir(parents=True, exist_ok=True)
        # a fresh folder per attempt: a copy left by an older attempt could be a chunk another runtime has since redone
        folder = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=self.scratch))
        return _S3Files(self, job_id, folder, stored)

    def exists(self, job_id: str, name: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(job_id, name))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._failure("HeadObject", exc) from None
        except BotoCoreError as exc:
            raise self._failure("HeadObject", exc) from None

    def names(self, job_id: str) -> list[str]:
        prefix = self.key(job_id)
        pages = self._call("ListObjectsV2", lambda: list(
            self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)))
        return sorted(obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", []))

    def delete(self, job_id: str, names: list[str]) -> None:
        keys = [{"Key": self.key(job_id, name)} for name in names]
        for start in range(0, len(keys), 1000):  # the most one DeleteObjects takes
            self._call("DeleteObjects", self.client.delete_objects, Bucket=self.bucket,
                       Delete={"Objects": keys[start:start + 1000], "Quiet": True})

    def remove(self, job_id: str) -> None:
        self.delete(job_id, self.names(job_id))

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"S3_BUCKET={self.bucket!r}" + (f" at S3_ENDPOINT_URL={self.endpoint}" if self.endpoint else "")
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            why = {"404": "no such bucket (create it first)", "NoSuchBucket": "no such bucket (create it first)",
                   "403": "access denied (check the AWS credentials and the bucket policy)"}.get(code, code)
            raise StoreUnavailable(f"output store {where}: {why}") from None
        except BotoCoreError as exc:
            raise StoreUnavailable(f"output store {where}: {exc} (check the credentials, S3_REGION "
                                   "and S3_ENDPOINT_URL)") from None

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def presigned_url(self, job_id: str, name: str) -> Optional[str]:
        if self.serve != "redirect":
            return None
        params = {"Bucket": self.bucket, "Key": self.key(job_id, name), "ResponseContentType": content_type(name)}
        return self._call("presign", self.signer.generate_presigned_url, "get_object", Params=params,
                          ExpiresIn=self.expiry_s)

    def stream(self, job_id: str, name: str) -> tuple[Iterator[bytes], int]:
        answer = self._call("GetObject", self.client.get_object, Bucket=self.bucket, Key=self.key(job_id, name))
        body = answer["Body"]

        def pieces() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(1 << 16)
            finally:
                body.close()

        return pieces(), int(answer["ContentLength"])


def build(settings: Settings) -> OutputStore:
    """The store OUTPUT_STORE names."""
    if settings.output_store == "s3":
        return S3Store(settings)
    return LocalStore(settings.jobs_dir)
