"""Settings: one object, env prefix `KOLORS_API_`, validated at start-up; CLI flags fill it too.

Example::

    KOLORS_API_DATA_DIR=/srv/kolors KOLORS_API_RETENTION_SECONDS=600 kolors-api serve --model tiny
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The store URL prefix of an SQLite file anywhere (else `sqlite`: the file under data_dir).
SQLITE_SCHEME = "sqlite:///"
#: `--model random:SIZE`: random weights of the tiny (small) or the real (full) shapes, built in memory
#: by `kolors_api.engine.random_weights` (benchmarks).
RANDOM_MODEL_SIZES = ("small", "full")
#: The store URL schemes of Redis (fleet mode).
FLEET_SCHEMES = ("redis://", "rediss://", "unix://")


class Settings(BaseSettings):
    """Everything a server or worker reads at start-up."""

    model_config = SettingsConfigDict(env_prefix="KOLORS_API_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    #: `tiny`, a local diffusers folder, a Hugging Face repo id, or `random:small` / `random:full` (random
    #: weights of the tiny or the real shapes, built in memory: benchmarks).
    model: str = "tiny"
    data_dir: Path = Path(".kolors-api")
    #: `sqlite` (embedded default, under data_dir), `sqlite:///relative.db` or `sqlite:////abs.db`, or
    #: the fleet's Redis: `redis://host:port/db`, `rediss://…` (TLS), `unix:///path/to/redis.sock`.
    store: str = "sqlite"
    #: `serve` starts and watches engine processes (one per device of `device`); off: an API only.
    worker: bool = True
    #: The engine processes' devices: one (`cuda:1`, `cpu`), a comma-separated list (`cuda:0,cuda:1`;
    #: a device may repeat: `cpu,cpu`), or `all` (every CUDA device); unset: CUDA when present, else CPU.
    device: str | None = None
    #: Weights' dtype: auto (float16 on CUDA, float32 on CPU), float16, bfloat16 or float32.
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    #: torch.compile the UNet; the worker compiles it at start for each of `compile_shapes`.
    compile: bool = False
    #: Shapes compiled at start, comma-separated WIDTHxHEIGHT (others compile on first use).
    compile_shapes: str = "1024x1024"
    #: How a compiled UNet meets batches: "pad" (each call padded to 1, 2, 4, 8 or 16 rows, every
    #: one compiled at start) or "dynamic" (one graph with dynamic shapes).
    compile_batches: Literal["pad", "dynamic"] = "pad"
    #: Where compiled kernels are kept across restarts (default: `compile-cache` under data_dir).
    compile_cache: Path | None = None
    #: Another VAE, a diffusers folder or repo id: an fp16-safe one (force_upcast false, e.g.
    #: madebyollin/sdxl-vae-fp16-fix) decodes in fp16 instead of fp32.
    vae: str | None = None
    #: Model CPU offload: each model is on the GPU only while it runs (cards of about 16 GB; slower).
    offload: bool = False
    #: Prompt embeddings cached on the device, in MiB (least recently used out; 0 = off).
    prompt_cache_mb: int = Field(256, ge=0)
    #: Images per engine call: queued jobs of one shape run together (0 = sized for the device; 1 = off).
    max_batch_images: int = Field(0, ge=0, le=256)
    #: Images × pixels per engine call, in millions (0 = sized for the device).
    max_batch_megapixels: float = Field(0.0, ge=0, le=1000)
    #: How long a claimed job waits for company of its shape before its call starts: -1 = the auto rule
    #: (`kolors_api.jobs.batching`), 0 = not at all, N = up to N ms.
    batch_wait_ms: int = Field(-1, ge=-1, le=60000)
    #: The engine factory, `package.module:factory`, called as `factory(settings)` by each worker (the
    #: contract: `kolors_api.worker.engines`); the default loads the Kolors pipeline `model` names.
    engine: str = "kolors_api.worker.engines:kolors"
    #: Where output images go: `s3://BUCKET/PREFIX` (S3, MinIO, R2…; the `s3` extra, credentials from
    #: the standard AWS_* settings) or `file:///DIR` (a folder every replica and worker shares). Unset:
    #: files under data_dir (SQLite), or in Redis (fleet).
    blob_url: str | None = None
    #: The old spelling of `blob_url=file://DIR` (used when blob_url is unset).
    blob_dir: Path | None = None
    #: Output URLs answer 302 to a presigned GET on the object store (valid no longer than the result
    #: is kept) instead of streaming the image through the API; s3:// blob URLs only.
    blob_redirect: bool = False
    #: Results (records and images) are kept this long, then 404.
    retention_seconds: float = Field(3600.0, gt=0)
    #: A sync request waits this long, then answers 504 with its request_id.
    sync_timeout_seconds: float = Field(300.0, gt=0)
    #: A claimed job whose lease is not renewed for this long is handed to another worker.
    lease_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(5.0, gt=0)
    #: After this many deliveries a job ends FAILED and goes to the dead letters.
    max_deliveries: int = Field(3, ge=1)
    #: Queued jobs beyond this answer 503 (0 = no cap).
    queue_cap: int = Field(0, ge=0)
    max_body_bytes: int = Field(1024 * 1024, gt=0)
    #: A connection that has not sent a whole request head this long after it opened (or after its
    #: next request's first byte) is closed (`kolors_api.api.connections`).
    header_timeout_seconds: float = Field(10.0, gt=0, le=3600)
    #: A request body not fully received this long after its head is cut off.
    body_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    #: Open client connections at most (and at most the open-file limit less a reserve); one beyond
    #: evicts the connection that has waited longest for its own head or body.
    max_connections: int = Field(1000, ge=16, le=1_000_000)
    bootstrap_key: str | None = None
    #: Public base URL for absolute links (status_url, output URLs); taken from the request if unset.
    public_url: str | None = None
    #: Without `public_url`, absolute URLs are built from the request's Host only when it names this
    #: server: the bind address, localhost, 127.0.0.1, ::1, or one of these (comma-separated; `*` =
    #: any Host). Any other Host is refused with 400 (probes: /healthz, /readyz, /metrics are exempt).
    allowed_hosts: str = ""
    #: Proxies whose `X-Forwarded-Proto`/`X-Forwarded-For` are believed (comma-separated addresses or
    #: networks, `*` = any); empty (the default): no client's, loopback included.
    forwarded_allow_ips: str = ""
    #: Credits per seed-sized image (1024², 25 steps).
    unit_price: float = Field(1.0, ge=0)
    #: Origins allowed by CORS, comma-separated (`*` for any); empty (the default) = CORS off.
    cors_origins: str = ""
    log_level: str = "info"
    #: Blocked prompt terms, one per line (`#` starts a comment line); replaces the built-in short
    #: list (`kolors_api.worker.safety.DEFAULT_BLOCKED_TERMS`). Read by the worker at start-up.
    blocked_terms_file: Path | None = None
    #: Output screeners, comma-separated: `nudenet` (needs the optional `safety` extra). None by default.
    screeners: str = ""
    #: NudeNet classes that block an image (comma-separated; see `kolors_api.worker.safety.NUDENET_CLASSES`).
    nudenet_classes: str = ("FEMALE_GENITALIA_EXPOSED,MALE_GENITALIA_EXPOSED,FEMALE_BREAST_EXPOSED,"
                            "BUTTOCKS_EXPOSED,ANUS_EXPOSED")
    #: Webhook hosts reached although the SSRF guard refuses their addresses (comma-separated host names,
    #: addresses or networks, e.g. `hooks.internal,10.0.5.0/24`): an operator's own receivers.
    webhook_allow_hosts: str = ""
    #: Hosts that image URLs may be fetched from although the SSRF guard refuses their addresses
    #: (comma-separated host names, addresses or networks, as `webhook_allow_hosts`).
    fetch_allow_hosts: str = ""
    #: The largest input picture taken (base64, data URI or URL), in bytes.
    max_image_bytes: int = Field(10 * 2**20, gt=0)
    #: How long fetching an image URL may take, redirects included, in seconds.
    fetch_timeout_seconds: float = Field(15.0, gt=0, le=300)
    #: The Kolors IP-Adapter-Plus (`--ip-adapter`): a Hugging Face repo id or a folder of the layout of
    #: Kwai-Kolors/Kolors-IP-Adapter-Plus, or `tiny` (with `--model tiny`, built offline); unset: none.
    ip_adapter: str | None = None
    #: Seconds between the tries of a webhook delivery (comma-separated; one try more than delays).
    webhook_retry_delays: str = "30,120,480,1200,1800"
    #: Webhook tries in flight at once in one API process (its delivery runner's connections).
    webhook_concurrency: int = Field(64, ge=1, le=4096)
    #: Webhook tries in flight at once to one destination: the address the SSRF guard connects to
    #: (and the port), however the URLs spell it.
    webhook_per_destination: int = Field(4, ge=1, le=4096)
    #: Webhook tries in flight at once for one API key, so that one key's receivers that hang never
    #: hold every slot (0 = a quarter of webhook_concurrency).
    webhook_per_key: int = Field(0, ge=0, le=4096)
    #: Seconds one try may take from the moment it is sent: connect, send, and the answer's status line.
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=300)
    #: On SIGINT/SIGTERM, how long `serve` (and `worker`) wait for what is in flight before they exit: the
    #: server's connections, webhook tries (one cut off stays in the outbox, sent after the next start),
    #: the engines' jobs in hand (an engine process still running is killed; its job goes back to the queue).
    shutdown_grace_seconds: float = Field(30.0, ge=0, le=3600)
    #: A detection of a blocking class at or above this score blocks the image (NudeNet reports none under 0.2).
    nudenet_threshold: float = Field(0.6, ge=0, le=1)

    @field_validator("compile_shapes")
    @classmethod
    def _shapes(cls, value: str) -> str:
        compile_shapes(value)
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies(cls, value: str) -> str:
        for item in (i.strip() for i in value.split(",")):
            if item and item != "*":
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"expected addresses or networks, comma-separated (or *), "
                                     f"got {item[:60]!r}") from None
        return value

    @field_validator("webhook_retry_delays")
    @classmethod
    def _delays(cls, value: str) -> str:
        retry_delays(value)
        return value

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if value == "sqlite" or (value.startswith(SQLITE_SCHEME) and len(value) > len(SQLITE_SCHEME)):
            return value
        if value.startswith(FLEET_SCHEMES):
            return value
        raise ValueError(f"expected sqlite, sqlite:///PATH, redis://HOST:PORT/DB, rediss://HOST:PORT/DB or "
                         f"unix:///PATH/TO/redis.sock, got {value!r}")

    @field_validator("blob_url")
    @classmethod
    def _blob_url(cls, value: str | None) -> str | None:
        return None if not value else check_blob_url(value)

    def blobs_url(self) -> str | None:
        """Where images go: `blob_url`, else `file://` + blob_dir, else None (the store's own place)."""
        if self.blob_url:
            return self.blob_url
        return Path(self.blob_dir).resolve().as_uri() if self.blob_dir is not None else None

    @property
    def fleet(self) -> bool:
        """True when the store is Redis (a fleet of API replicas and workers), False for SQLite."""
        return self.store.startswith(FLEET_SCHEMES)

    def sqlite_path(self) -> Path:
        """The SQLite database file: the `sqlite:///` path, else `kolors-api.sqlite3` under data_dir."""
        if self.store.startswith(SQLITE_SCHEME):
            return Path(self.store[len(SQLITE_SCHEME):])
        return self.data_dir / "kolors-api.sqlite3"


def check_blob_url(url: str) -> str:
    """`url` when it is a blob URL (`kolors_api.jobs.blobs.make_blobs`), else ValueError naming the forms."""
    if url.startswith("file:///") and len(url) > len("file:///"):
        return url
    if url.startswith("s3://") and urlsplit(url).netloc:
        return url
    raise ValueError(f"expected s3://BUCKET[/PREFIX] or file:///PATH, got {url[:100]!r}")


def compile_shapes(value: str) -> tuple[tuple[int, int], ...]:
    """`"1024x1024,768x1344"` -> ((1024, 1024), (768, 1344)); each side a multiple of 8 in 256..2048."""
    shapes = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        width, sep, height = item.lower().partition("x")
        if not (sep and width.isascii() and width.isdigit() and height.isascii() and height.isdigit()
                and len(width) <= 4 and len(height) <= 4):
            raise ValueError(f"expected WIDTHxHEIGHT[,WIDTHxHEIGHT...], got {item[:40]!r}")
        shape = (int(width), int(height))
        if not all(256 <= side <= 2048 and side % 8 == 0 for side in shape):
            raise ValueError(f"{item}: each side must be a multiple of 8 from 256 to 2048")
        shapes.append(shape)
    return tuple(shapes)


def retry_delays(value: str) -> tuple[float, ...]:
    """`"30,120,480"` -> (30.0, 120.0, 480.0): the delays before a webhook's 2nd, 3rd… try."""
    try:
        delays = tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected seconds, comma-separated (30,120,480), got {value[:60]!r}") from None
    if any(not 0 <= d <= 86400 for d in delays):
        raise ValueError(f"each delay must be 0..86400 seconds, got {value[:60]!r}")
    return delays


def random_model_size(model: str) -> str | None:
    """`random:full` -> "full" (likewise "small"); None for a model that is not random; ValueError
    for another size."""
    if not model.startswith("random:"):
        return None
    size = model.removeprefix("random:")
    if size not in RANDOM_MODEL_SIZES:
        names = ", ".join(f"random:{s}" for s in RANDOM_MODEL_SIZES)
        raise ValueError(f"model {model[:60]!r}: the random models are {names}")
    return size
