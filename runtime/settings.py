"""The runtime's one settings object, read from the environment (and `.env`)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

_REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Every knob of the runtime; the environment variable is the field name in capitals."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False, use_attribute_docstrings=True)

    host: str = Field(default="127.0.0.1", max_length=255)
    """Interface to listen on; 0.0.0.0 inside a container."""

    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port of the public API."""

    gpu_service_url: str = Field(default="http://127.0.0.1:8001", pattern=r"^https?://", max_length=2048)
    """Base URL of the GPU service (speech, video, avatars), when there is one."""

    gpu_service_urls: Annotated[list[str], NoDecode] = Field(default_factory=list, max_length=64)
    """Base URLs of several GPU services (comma-separated or a JSON list); when set, GPU_SERVICE_URL is not used.
    Each chunk goes to one of the ready ones: see runtime/gpu_client.py."""

    gpu_health_interval_s: float = Field(default=2.0, ge=0.1, le=300)
    """How often each GPU service's /health is polled for its state and free slots."""

    gpu_health_timeout_s: float = Field(default=2.0, gt=0, le=60)
    """Timeout of one /health poll; a service that does not answer in time is marked down."""

    gpu_balance_factor: float = Field(default=1.25, ge=1.0, le=10.0)
    """Bounded load of avatar affinity: a chunk leaves its avatar's service once that service has more than
    this many times the average number of jobs in flight."""

    data_dir: Path = Field(default=_REPO_ROOT / ".data" / "runtime")
    """Holds the job database (jobs.db, unless DATABASE_URL is set) and each job's work folder and outputs
    (with OUTPUT_STORE=s3, only the folders of the jobs running here)."""

    database_url: Optional[str] = Field(default=None, max_length=4096)
    """The job record when several runtimes share it: postgresql://user:password@host:5432/dbname (psycopg 3;
    postgresql+psycopg:// too). Unset: a SQLite file at DATA_DIR/jobs.db, for one runtime."""

    database_pool_size: int = Field(default=5, ge=1, le=100)
    """Connections one runtime process keeps open to the job database (twice as many more in bursts)."""

    output_store: Literal["local", "s3"] = "local"
    """Where job outputs (and the chunks a retried job resumes from) are kept: `local` (DATA_DIR/jobs, one
    runtime or a shared disk) or `s3` (S3-compatible object storage that every runtime reaches)."""

    s3_bucket: Optional[str] = Field(default=None, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    """Bucket of the outputs with OUTPUT_STORE=s3 (it must exist). Credentials: the usual AWS variables
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE) or an instance role."""

    s3_endpoint_url: Optional[str] = Field(default=None, pattern=r"^https?://", max_length=2048)
    """Endpoint of an S3-compatible service (MinIO, Ceph, R2...); unset: AWS S3 of S3_REGION."""

    s3_public_endpoint_url: Optional[str] = Field(default=None, pattern=r"^https?://", max_length=2048)
    """Endpoint that clients reach, when it differs from S3_ENDPOINT_URL (an internal hostname): presigned
    URLs are signed for it."""

    s3_region: Optional[str] = Field(default=None, pattern=r"^[a-z0-9-]{2,32}$")
    """Region of the bucket (AWS_DEFAULT_REGION when unset)."""

    s3_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9!_.*'()/-]*$", max_length=512)
    """Key prefix of the runtime's objects in the bucket (e.g. avatar/); objects are <prefix><job id>/<file>."""

    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """How bucket names go into URLs; some S3-compatible services need `path`."""

    s3_serve: Literal["redirect", "stream"] = "redirect"
    """How the runtime answers for an output in S3: `redirect` (307 to a presigned URL: the bytes never pass
    through the runtime) or `stream` (the runtime reads the object and sends it, for clients or networks
    that must not reach the bucket)."""

    s3_presign_expiry_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    """Lifetime of a presigned URL (S3 allows at most 7 days)."""

    redis_url: Optional[str] = Field(default=None, pattern=r"^rediss?://", max_length=2048)
    """When set, jobs go through Redis (RedisBroker) so several workers can share them; else in-process."""

    redis_namespace: str = Field(default="dramatiq", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Prefix of the broker's Redis keys (Dramatiq's namespace: its queue is `<namespace>:avatar_jobs`). Every
    runtime and worker of one deployment uses the same; another deployment (or test run) on the same Redis
    database sets its own so their jobs never meet."""

    run_worker: bool = True
    """Run job workers inside the API process. Off for an API-only process in a Redis scale-out."""

    worker_threads: int = Field(default=2, ge=1, le=64)
    """Jobs one process runs at the same time."""

    max_text_chars: int = Field(default=20_000, ge=1, le=1_000_000)
    """Longest text accepted; longer is a 422 naming the limit."""

    chunk_chars: int = Field(default=400, ge=50, le=5000)
    """Target size of one generation chunk (whole sentences are grouped up to about this many characters)."""

    first_chunk_chars: int = Field(default=100, ge=0, le=5000)
    """Cap on the first chunk (0: no cap). A short first chunk lets the next chunk's speech overlap its video."""

    max_request_bytes: int = Field(default=25 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    """Largest request body accepted (base64 media included); larger is a 413."""

    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    """Largest decoded avatar_image."""

    max_image_pixels: int = Field(default=4096 * 4096, ge=64 * 64, le=1 << 30)
    """Largest avatar_image in pixels (width x height), read from its header before anything decodes it."""

    default_avatar_id: Optional[str] = Field(default="astronaut", pattern=r"^[A-Za-z0-9._-]{1,128}$")
    """Avatar of a request that sends neither avatar_id nor avatar_image (a preset of the GPU service).
    Empty: such requests are refused."""

    max_speaker_wav_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    """Largest decoded speaker_wav."""

    fps: int = Field(default=25, ge=5, le=60)
    """Frame rate of the generated video."""

    sync_timeout_s: float = Field(default=300.0, gt=0, le=3600)
    """How long a synchronous submit waits; past that it answers 202 with the status_url instead."""

    job_max_retries: int = Field(default=20, ge=0, le=1000)
    """Times a job is retried after a transient failure (GPU service down, 5xx, 429) before it fails."""

    retry_min_backoff_s: float = Field(default=0.5, gt=0, le=600)
    """First retry delay; it doubles each time up to retry_max_backoff_s."""

    retry_max_backoff_s: float = Field(default=15.0, gt=0, le=3600)
    """Longest delay between two retries."""

    gpu_timeout_s: float = Field(default=300.0, gt=0, le=3600)
    """Read timeout of one GPU-service call (generation of one chunk)."""

    gpu_connect_timeout_s: float = Field(default=3.0, gt=0, le=120)
    """Connect timeout of a GPU-service call."""

    job_time_limit_s: float = Field(default=3600.0, ge=10, le=24 * 3600)
    """Longest a job may run once started; past it the attempt is aborted and retried."""

    job_lease_s: float = Field(default=30.0, ge=2, le=3600)
    """A running job's lease; renewed while it runs. A dead worker's job is taken over once it lapses."""

    job_ttl_s: float = Field(default=7 * 24 * 3600.0, ge=60, le=365 * 24 * 3600)
    """Age after which a finished job's outputs are removed (its URLs then answer 404)."""

    webhook_secret: Optional[str] = Field(default=None, min_length=16, max_length=512)
    """Key of the webhook signature (HMAC-SHA256 of the raw body). Webhooks are refused while unset."""

    webhook_allow_private: bool = False
    """Allow webhook targets on private, loopback or link-local addresses (SSRF guard off)."""

    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Hosts or IPs allowed as webhook targets even when private (comma-separated), e.g. 127.0.0.1."""

    webhook_max_attempts: int = Field(default=6, ge=1, le=100)
    """Deliveries tried for one webhook (with backoff) before it is given up."""

    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)
    """Timeout of one webhook delivery."""

    runtime_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """API keys (comma-separated). When set, every /api call needs one (X-API-Key or Authorization: Bearer)."""

    public_url: Optional[str] = Field(default=None, pattern=r"^https?://", max_length=2048)
    """Base URL clients reach the runtime at, for the URLs in answers; the request's own base when unset."""

    avatar_cache_s: float = Field(default=10.0, ge=0, le=3600)
    """How long the GPU service's avatar list is trusted when checking avatar_id."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Level of the structured (JSON) logs."""

    metrics_require_key: bool = False
    """Put /metrics behind the API keys too (a Prometheus scraper then sends one); needs RUNTIME_API_KEYS."""

    stream_token_secret: Optional[str] = Field(default=None, min_length=16, max_length=512)
    """Key that signs the per-session tokens of /api/v1/stream (HMAC-SHA256 of the session's id). Runtimes behind
    one load balancer share it, so any of them serves any session; unset: a random key per process (a session
    is then reached only through the runtime that created it, and not after it restarts)."""

    stream_ice_servers: Annotated[list[dict], NoDecode] = Field(default_factory=list, max_length=16)
    """STUN/TURN servers handed to browsers for their RTCPeerConnection (a JSON list of RTCIceServer objects,
    e.g. [{"urls": "stun:stun.example.org:3478"}]); those the GPU service names for the session come first."""

    stream_timeout_s: float = Field(default=30.0, gt=0, le=600)
    """Read timeout of one call the runtime relays to a stream session (create, offer, say, interrupt, delete).
    A session's event stream has no read timeout: it lasts as long as the session."""

    stream_keepalive_s: float = Field(default=15.0, ge=0.1, le=300)
    """A relayed event stream that has been quiet this long gets a comment line (between events), so that
    proxies keep the connection and a viewer that left is noticed."""

    @field_validator("stream_ice_servers", mode="before")
    @classmethod
    def _ice_servers(cls, value: object) -> object:
        """A JSON list of {urls, username?, credential?}; empty means none."""
        if isinstance(value, str):
            import json

            value = json.loads(value) if value.strip() else []
        if isinstance(value, list):
            for server in value:
                if not isinstance(server, dict) or not isinstance(server.get("urls"), (str, list)):
                    raise ValueError('each ICE server is an object with "urls", e.g. {"urls": "stun:host:3478"}')
        return value

    @field_validator("runtime_api_keys", "webhook_allowed_hosts", "gpu_service_urls", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        """Accept `A,B` as well as a JSON list."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("gpu_service_urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        """Each an http(s) URL, none twice (a service listed twice would take twice its share)."""
        cleaned = [url.strip().rstrip("/") for url in urls]
        for url in cleaned:
            if not re.match(r"^https?://[^/?#]+", url) or len(url) > 2048:
                raise ValueError(f"{url!r} is not an http(s) base URL such as http://10.0.0.5:8001")
        twice = sorted({url for url in cleaned if cleaned.count(url) > 1})
        if twice:
            raise ValueError(f"listed more than once: {', '.join(twice)}")
        from runtime.gpu_client import service_label

        labels = [service_label(url) for url in cleaned]  # services are told apart (and reported) by host:port
        shared = sorted({url for url, label in zip(cleaned, labels) if labels.count(label) > 1})
        if shared:
            raise ValueError(f"these share one host:port, which names a GPU service: {', '.join(shared)}; "
                             "give each service its own host or port")
        return cleaned

    @field_validator("redis_url", "webhook_secret", "public_url", "default_avatar_id", "stream_token_secret", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """An empty variable (as compose writes `REDIS_URL=`) means unset."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url", "s3_bucket", "s3_endpoint_url", "s3_public_endpoint_url", "s3_region",
                     "output_store", "s3_serve", "s3_addressing_style", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object, info: ValidationInfo) -> object:
        """An empty variable (compose's `DATABASE_URL=`) means unset: None, or the field's default."""
        if isinstance(value, str) and not value.strip():
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: Optional[str]) -> Optional[str]:
        """postgresql:// gets the psycopg 3 driver; an unsupported URL is refused, naming DATABASE_URL."""
        from runtime.db import normalize_url

        return None if value is None else normalize_url(value)

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> "Settings":
        """OUTPUT_STORE=s3 without S3_BUCKET cannot work: refused at start-up rather than at the first job."""
        if self.output_store == "s3" and not self.s3_bucket:
            raise ValueError("OUTPUT_STORE=s3 needs S3_BUCKET (the bucket the outputs go to)")
        return self

    @property
    def database(self) -> str:
        """The job database's SQLAlchemy URL: DATABASE_URL, else the SQLite file in DATA_DIR."""
        return self.database_url or f"sqlite:///{self.db_path}"

    @property
    def scratch_dir(self) -> Path:
        """Local working folders of jobs whose files are kept in object storage."""
        return self.data_dir / "scratch"

    @model_validator(mode="after")
    def _metrics_key_needs_keys(self) -> "Settings":
        """METRICS_REQUIRE_KEY without any key to require would leave /metrics open while saying it is closed."""
        if self.metrics_require_key and not self.runtime_api_keys:
            raise ValueError("METRICS_REQUIRE_KEY=true needs RUNTIME_API_KEYS (there is no key to require)")
        return self

    @property
    def gpu_urls(self) -> list[str]:
        """The GPU services jobs go to: GPU_SERVICE_URLS, or the one GPU_SERVICE_URL."""
        return self.gpu_service_urls or [self.gpu_service_url.rstrip("/")]

    @property
    def db_path(self) -> Path:
        """The SQLite job database."""
        return self.data_dir / "jobs.db"

    @property
    def jobs_dir(self) -> Path:
        """Parent of every job's work folder."""
        return self.data_dir / "jobs"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests build their own `Settings` and pass it to `create_app`."""
    return Settings()
