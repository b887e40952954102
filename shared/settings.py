"""Settings: one pydantic-settings class per process, every variable prefixed ``DETFLEET_``.

Each process loads exactly one class through :func:`load_settings`, which turns pydantic's multi-line
report into a one-line :class:`SettingsError` naming the variable, and first rejects ``DETFLEET_``
variables that no settings class knows (pydantic's ``extra="forbid"`` never sees the environment).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import SettingsError

ENV_PREFIX = "DETFLEET_"
ENV_FILE = ".env"

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/detfleet"
DEFAULT_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672/"
SHIPPED_MODEL_NAME = "detfleet-line-320.onnx"

Lane = Literal["realtime", "bulk"]
QueueType = Literal["classic", "quorum"]


def shipped_model_path() -> Path:
    """The detector trained for this project: ``models/`` of a checkout, or ``detfleet/models`` of a wheel."""
    root = Path(__file__).resolve().parent.parent
    in_wheel = root / "detfleet" / "models" / SHIPPED_MODEL_NAME
    return in_wheel if in_wheel.exists() else root / "models" / SHIPPED_MODEL_NAME


def amqp_node_urls(value: str) -> list[str]:
    """The node URLs of an AMQP setting: one URL, or several separated by commas (a cluster), in order."""
    return [part.strip() for part in value.split(",") if part.strip()]


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``****``, for logs, errors and ``--help``.

    Handles the two lists a setting may hold: AMQP node URLs separated by commas, and a libpq multi-host
    URL (``postgresql://user:pw@h1:5432,h2:5432/db``), whose hosts after the first carry no password."""
    return ",".join(_mask_one(part) if "://" in part else part for part in url.split(","))


def _mask_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]  # keeps the port as written (or absent)
    netloc = f"{parts.username}:****@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def database_hosts(url: str) -> list[str]:
    """The ``host:port`` entries of a Postgres URL: one, or several for a primary and its standbys."""
    netloc = urlsplit(url).netloc.rsplit("@", 1)[-1]
    return [host for host in netloc.split(",") if host]


def _check_scheme(url: str, schemes: Iterable[str]) -> str:
    allowed = tuple(schemes)
    parts = urlsplit(url)
    if parts.scheme not in allowed or not parts.hostname:
        raise ValueError(f"expected a URL like {allowed[0]}://user:password@host:port/...")
    return url


# TLS: certificate files ride on the URLs as query parameters (docs/deployment.md, "TLS"): aiormq's names
# on ``amqps://`` (shared.broker.tls hands them to pika too), libpq's on Postgres (asyncpg reads them).
AMQP_CERTIFICATE_PARAMS = ("cafile", "certfile", "keyfile")
DATABASE_CERTIFICATE_PARAMS = ("sslrootcert", "sslcert", "sslkey")


def _check_certificate_files(url: str, params: Iterable[str]) -> str:
    """A certificate file the URL names must exist: a typo stops start-up, not the first connect."""
    wanted = tuple(params)
    for key, value in parse_qsl(urlsplit(url).query):
        if key in wanted and not Path(value).is_file():
            raise ValueError(f"{key} {value} is not a readable file")
    return url


def _check_read_write_target(url: str) -> None:
    """Several database hosts must say which to pick: without ``target_session_attrs=read-write`` a
    client could land on a read-only standby and every write would fail."""
    attrs = dict(parse_qsl(urlsplit(url).query)).get("target_session_attrs")
    if attrs not in ("read-write", "primary"):
        raise ValueError("several database hosts need ?target_session_attrs=read-write on the URL")


class DetfleetSettings(BaseSettings):
    """Fields every process has: where the broker, its management API and the database are, and logging."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=ENV_FILE, extra="ignore", frozen=True, validate_default=True
    )

    amqp_url: str = Field(
        DEFAULT_AMQP_URL,
        description="RabbitMQ AMQP URL, the path is the vhost; a cluster: node URLs separated by commas",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log threshold")
    log_json: bool | None = Field(
        None, description="JSON lines on stderr; unset: text on a terminal, JSON otherwise"
    )

    _url_schemes: ClassVar[dict[str, tuple[str, ...]]] = {
        "amqp_url": ("amqp", "amqps"),
        "management_url": ("http", "https"),
        "database_url": ("postgresql", "postgres"),
    }

    @field_validator("amqp_url", "management_url", "database_url", check_fields=False)
    @classmethod
    def _valid_url(cls, value: str, info: Any) -> str:
        # Several AMQP node URLs (a cluster) are each checked; they must all name the same vhost.
        urls = amqp_node_urls(value) if info.field_name == "amqp_url" else [value]
        if not urls:
            raise ValueError("expected a URL like amqp://user:password@host:port/...")
        params = {"amqp_url": AMQP_CERTIFICATE_PARAMS, "database_url": DATABASE_CERTIFICATE_PARAMS}
        for url in urls:
            _check_scheme(url, cls._url_schemes[info.field_name])
            _check_certificate_files(url, params.get(info.field_name, ()))
        if len({urlsplit(url).path.rstrip("/") or "/" for url in urls}) > 1:
            raise ValueError("every node URL must name the same vhost (the path)")
        if info.field_name == "database_url" and len(database_hosts(value)) > 1:
            _check_read_write_target(value)
        return value

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with every password masked: what start-up logs."""
        return {k: mask_url(v) if k.endswith("_url") else v for k, v in self.model_dump().items()}

    def __repr_args__(self) -> Any:
        return list(self.masked().items())


class TopologySettings(DetfleetSettings):
    """The queue limits operators tune; they become policies (never x-arguments, see shared.topology)."""

    queue_type: QueueType = Field("classic", description="classic for one node, quorum for a cluster")
    realtime_ttl_ms: int = Field(10_000, gt=0, description="How long a realtime frame may wait")
    realtime_max_length: int = Field(10_000, gt=0, description="Realtime cap; the oldest frames are dropped")
    bulk_ttl_ms: int = Field(86_400_000, gt=0, description="How long a bulk frame may wait")
    bulk_max_length: int = Field(1_000_000, gt=0, description="Bulk cap; publishers get a nack beyond it")
    retry_delays_ms: tuple[int, ...] = Field(
        (1_000, 10_000, 60_000), min_length=1, description="Delay of each retry level, JSON list"
    )
    quorum_delivery_limit: int = Field(1_000, gt=0, description="Quorum queues only: crash-loop backstop")
    quorum_initial_group_size: int = Field(
        3, ge=1, description="Quorum queues only: replicas of each queue (at most one per node)"
    )

    @field_validator("retry_delays_ms")
    @classmethod
    def _positive_increasing(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(d <= 0 for d in value) or list(value) != sorted(set(value)):
            raise ValueError("retry delays must be positive and strictly increasing")
        return value


class AdminSettings(TopologySettings):
    """Operations commands: topology, broker bootstrap, database migrations, DLQ tools."""

    management_url: str = Field(DEFAULT_MANAGEMENT_URL, description="RabbitMQ management API URL")
    database_url: str = Field(DEFAULT_DATABASE_URL, description="Postgres URL; created if missing")
    producer_password: SecretStr | None = Field(None, description="bootstrap: password of detfleet-producer")
    consumer_password: SecretStr | None = Field(None, description="bootstrap: password of detfleet-consumer")
    ops_password: SecretStr | None = Field(None, description="bootstrap: password of detfleet-ops")
    monitoring_password: SecretStr | None = Field(
        None, description="bootstrap: password of detfleet-monitoring"
    )
    subscriber_password: SecretStr | None = Field(
        None, description="bootstrap: password of detfleet-subscriber"
    )
    gateway_password: SecretStr | None = Field(None, description="bootstrap: password of detfleet-gateway")
    secrets_dir: Path | None = Field(None, description="bootstrap: folder of files named after each user")
    audit_log: Path = Field(
        Path("detfleet-audit.jsonl"), description="dlq replay and purge: JSON-lines audit log, appended"
    )

    def password_for(self, user: str) -> str | None:
        """The password of broker user ``user``: its variable first, else a file in ``secrets_dir``."""
        secret: SecretStr | None = getattr(self, user.removeprefix("detfleet-") + "_password", None)
        if secret is not None:
            return secret.get_secret_value()
        path = self.secrets_dir / user if self.secrets_dir else None
        return path.read_text().strip() if path and path.is_file() else None


class ProducerSettings(DetfleetSettings):
    """A camera gateway: the publisher library and ``detfleet produce``."""

    producer_name: str = Field(default_factory=socket.gethostname, description="app_id of every publish")
    lane: Lane = Field("bulk", description="Default lane of published frames")
    realtime_deadline_ms: int = Field(10_000, gt=0, description="Realtime deadline after captured_at")
    confirm_timeout_s: float = Field(10.0, gt=0, description="How long one publish waits for its confirm")
    max_in_flight: int = Field(256, gt=0, description="Unconfirmed publishes in flight at once")
    nack_retries: int = Field(5, ge=0, description="Bulk backpressure: retries of a nacked publish")
    nack_backoff_s: float = Field(0.2, gt=0, description="Bulk backpressure: first backoff, doubling")
    realtime_buffer: int = Field(100, gt=0, description="Frames held while the broker is away (oldest drop)")
    bulk_buffer: int = Field(1_000, gt=0, description="Frames held while the broker is away (caller waits)")
    bulk_block_timeout_s: float = Field(30.0, gt=0, description="How long a bulk publish may wait for room")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of frames encoded from video")


class ConsumerSettings(TopologySettings):
    """A worker replica: ``detfleet consume``."""

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="Postgres URL of the results table; h1:p,h2:p?target_session_attrs=read-write fails over",
    )
    consumer_id: str = Field(default_factory=socket.gethostname, description="Stored on every row")
    max_batch: int = Field(16, gt=0, le=1024, description="Largest inference batch")
    max_wait_ms: int = Field(20, ge=0, description="How long a partial batch waits for more frames")
    batches_in_flight: int = Field(2, gt=0, description="Batches decoding or inferring at once")
    prefetch: int | None = Field(
        None, gt=0, description="Bulk prefetch; default max_batch x (batches_in_flight + 1)"
    )
    realtime_prefetch: int | None = Field(None, gt=0, description="Realtime prefetch; default max_batch")
    model_path: Path = Field(
        default_factory=shipped_model_path, description="ONNX model; default the shipped detector"
    )
    labels_path: Path | None = Field(
        None, description="Class names, one a line; wins over the model's metadata"
    )
    confidence: float = Field(0.25, ge=0, le=1, description="Minimum detection score")
    iou: float = Field(0.45, ge=0, le=1, description="NMS IoU threshold")
    max_detections: int = Field(300, gt=0, description="Most detections kept per image")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="ONNX Runtime provider choice")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads; 0 lets it choose")
    decode_threads: int = Field(2, gt=0, description="Threads decoding frames")
    max_retries: int = Field(3, ge=0, description="Retries of a transient failure before the DLQ")
    max_crashes: int = Field(
        2, ge=1, description="Unfinished starts of a redelivered task before it is failed unrun"
    )
    metrics_max_cameras: int = Field(
        200, gt=0, description="Cameras with series of their own; the rest share camera=other"
    )
    oom_cooldown_s: float = Field(
        30.0, gt=0, description="After an out-of-memory batch: how long the halved batch limit holds"
    )
    max_hold_s: float = Field(300.0, gt=0, description="Longest a message is held unacked")
    shutdown_grace_s: float = Field(20.0, gt=0, description="SIGTERM: time to finish the batch in flight")
    health_port: int = Field(8080, ge=0, le=65535, description="/livez, /readyz, /metrics; 0 disables")
    stall_s: float = Field(
        60.0, gt=0, description="/livez fails when work is held but no batch ends for this"
    )
    exit_when_idle_s: float | None = Field(None, gt=0, description="Exit 0 after this long with no work")
    result_events: bool = Field(
        True, description="Publish one event per committed row to detfleet.results (docs/results.md)"
    )

    @property
    def bulk_prefetch(self) -> int:
        return self.prefetch or self.max_batch * (self.batches_in_flight + 1)

    @property
    def lane_realtime_prefetch(self) -> int:
        return self.realtime_prefetch or self.max_batch


class SubscriberSettings(DetfleetSettings):
    """``detfleet results``: rows from Postgres, live events, and the webhook forwarder (docs/results.md)."""

    database_url: str = Field(DEFAULT_DATABASE_URL, description="Postgres URL of the results table")
    webhook_secret: SecretStr | None = Field(
        None, description="results forward: HMAC key of the webhook signatures (or --secret-env)"
    )
    webhook_max_attempts: int = Field(
        5, ge=1, description="results forward: POSTs of one event before it is parked"
    )
    webhook_backoff_s: float = Field(
        0.5, gt=0, description="results forward: first wait after a failed POST, doubling"
    )
    webhook_max_backoff_s: float = Field(
        30.0, gt=0, description="results forward: longest wait between two POSTs of one event"
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="results forward: limit of one POST")
    webhook_prefetch: int = Field(
        64, gt=0, description="results forward: events held at once (each camera's in order)"
    )


class GatewayToken(BaseModel):
    """One bearer token of the HTTP gateway, as stored: its sha256 (never the token) and its scopes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # Cameras it may publish for, as ``site/camera`` globs (``line-1/*``, ``*``); empty: none.
    publish: tuple[str, ...] = ()
    # Whether it may read results: GET /v1/tasks, the result streams, the live page's data.
    read: bool = False


class GatewaySettings(ProducerSettings, TopologySettings):
    """The HTTP gateway, ``detfleet gateway``: a producer that also reads results and shows the fleet."""

    database_url: str = Field(DEFAULT_DATABASE_URL, description="Postgres URL of the results table")
    management_url: str = Field(DEFAULT_MANAGEMENT_URL, description="RabbitMQ management API URL")
    gateway_host: str = Field("127.0.0.1", description="Address the HTTP gateway listens on")
    gateway_port: int = Field(8000, ge=0, le=65535, description="Port the HTTP gateway listens on")
    gateway_tokens_file: Path | None = Field(
        None, description="JSON file of bearer tokens (sha256 and scopes each); see docs/gateway-http.md"
    )
    gateway_tokens: tuple[GatewayToken, ...] = Field(
        (), description="Bearer tokens as a JSON list, beside those of the file"
    )
    gateway_auth_disabled: bool = Field(False, description="No authentication at all: local demos only")
    gateway_rate: float = Field(50.0, gt=0, description="Frames per second each identity may POST")
    gateway_burst: int = Field(100, gt=0, description="Frames an identity may POST at once above its rate")
    gateway_publish_timeout_s: float = Field(
        5.0, gt=0, description="How long a POST waits for the broker's confirm before a 503"
    )
    gateway_retry_after_s: int = Field(2, ge=1, description="Retry-After of a 503 (broker away or full)")
    gateway_frame_cameras: int = Field(
        200, ge=0, description="Cameras whose latest frame is kept in memory for the live page"
    )
    gateway_stream_buffer: int = Field(
        1_000, gt=0, description="Events held for one slow result stream before the oldest drop"
    )
    gateway_fleet_refresh_s: float = Field(
        5.0, gt=0, description="How often the live page's fleet figures are collected at most"
    )

    @field_validator("gateway_tokens_file")
    @classmethod
    def _tokens_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value


SETTINGS_CLASSES: tuple[type[DetfleetSettings], ...] = (
    AdminSettings,
    ProducerSettings,
    ConsumerSettings,
    SubscriberSettings,
    GatewaySettings,
)

S = TypeVar("S", bound=DetfleetSettings)


def known_variables() -> set[str]:
    """Every ``DETFLEET_`` variable some settings class reads."""
    return {ENV_PREFIX + name.upper() for cls in SETTINGS_CLASSES for name in cls.model_fields}


def reject_unknown_variables(environ: Mapping[str, str], env_file: Path | None = None) -> None:
    """Raise on the first ``DETFLEET_`` variable (environment or ``.env``) no settings class knows."""
    names = set(environ)
    if env_file is not None and env_file.is_file():
        names |= set(dotenv_values(env_file))
    unknown = sorted(
        n for n in names if n.upper().startswith(ENV_PREFIX) and n.upper() not in known_variables()
    )
    if unknown:
        raise SettingsError(f"{unknown[0]}: unknown setting (a typo? see the README's configuration table)")


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "?"
    value = first.get("input")
    shown = mask_url(value) if isinstance(value, str) and field.endswith("_url") else value
    message = first["msg"].removeprefix("Value error, ")
    return f"{ENV_PREFIX}{field.upper()}: {message} (got {shown!r})"


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Load and validate one settings class, or raise a one-line :class:`SettingsError`."""
    reject_unknown_variables(os.environ, Path(ENV_FILE))
    try:
        return cls(**overrides)
    except ValidationError as error:
        raise SettingsError(_one_line(error)) from None
