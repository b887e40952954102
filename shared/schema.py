"""Wire contract version 1: the detection task, and its mapping to and from an AMQP message.

The broker seam converts library messages to and from :class:`Envelope`, so this module (and everything
that validates tasks) never sees pika or aio-pika types.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.errors import TaskValidationError, UnsupportedSchemaError

SCHEMA_VERSION = 1
LANES = ("realtime", "bulk")
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_NAME_RE = re.compile(NAME_PATTERN)

H_SCHEMA = "x-detfleet-schema"
H_CAMERA = "camera_id"
H_SITE = "site"
H_CAPTURED_AT = "captured_at"
H_TRACE_ID = "trace_id"
H_ATTEMPT = "x-detfleet-attempt"
H_DEADLINE = "x-detfleet-deadline"
# When the producer sent the message, in whole milliseconds since the Unix epoch (UTC). The AMQP timestamp
# property has whole seconds only, too coarse for a queue wait of a few milliseconds; it stays as the
# fallback for gateways that do not send this header.
H_PUBLISHED_AT = "x-detfleet-published-at"
# Added to a dead-letter copy: why it failed, where it came from, when.
H_REASON = "x-detfleet-reason"
H_ORIGINAL_EXCHANGE = "x-detfleet-original-exchange"
H_ORIGINAL_ROUTING_KEY = "x-detfleet-original-routing-key"
H_FAILED_AT = "x-detfleet-failed-at"
# Set by ``detfleet dlq replay`` on each copy it sends back: how many times this task was replayed. It rides
# along into a later DLQ copy, so a task that keeps failing is refused after a limit.
H_REPLAYS = "x-detfleet-replays"
DEAD_LETTER_HEADERS = (H_REASON, H_ORIGINAL_EXCHANGE, H_ORIGINAL_ROUTING_KEY, H_FAILED_AT)
# Set by RabbitMQ when it dead-letters; removed on every republish (3.10 drops dead-letter cycles
# silently, 4.0 ignores client-set x-death). Our own headers carry the history.
BROKER_DEATH_HEADERS = (
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
)

Lane = Literal["realtime", "bulk"]
# A reason quotes at most this much of the offending value: it travels in a DLQ header and a result row,
# and a header of tens of kilobytes quoted whole would make the DLQ copy too big for one AMQP frame.
QUOTE_LIMIT = 80


@dataclass(frozen=True)
class Envelope:
    """An AMQP message as plain data: what the broker seam hands over and takes back."""

    body: bytes
    routing_key: str
    exchange: str = ""
    message_id: str | None = None
    timestamp: datetime | None = None
    app_id: str | None = None
    content_type: str | None = None
    expiration_ms: int | None = None
    delivery_mode: int = 2
    headers: Mapping[str, Any] = field(default_factory=dict)
    redelivered: bool = False

    def republished(self, **headers: Any) -> Envelope:
        """A copy to publish again: broker death headers and the per-message TTL removed, ``headers`` set."""
        kept = {k: v for k, v in self.headers.items() if k not in BROKER_DEATH_HEADERS}
        return replace(self, headers={**kept, **headers}, expiration_ms=None, redelivered=False)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. ``2026-11-23T08:00:00.123Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("has no time zone")
    return moment.astimezone(UTC)


def check_name(kind: str, value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(f"{kind} must match [A-Za-z0-9_-]{{1,64}} (no dots or wildcards), got {value!r}")
    return value


def routing_key(lane: str, site: str, camera_id: str) -> str:
    """``<lane>.<site>.<camera>``, refusing names that would break topic routing."""
    if lane not in LANES:
        raise ValueError(f"lane must be realtime or bulk, got {lane!r}")
    return f"{lane}.{check_name('site', site)}.{check_name('camera', camera_id)}"


def deterministic_task_id(site: str, camera_id: str, captured_at: datetime) -> uuid.UUID:
    """UUIDv5 of site, camera and capture time: a gateway resending a frame makes no second task.

    Right only where the capture time identifies the frame (a camera's own clock); a source that has a
    better identity for its frames passes it to :func:`frame_task_id` instead.
    """
    return uuid.uuid5(uuid.NAMESPACE_URL, f"detfleet:{site}/{camera_id}@{format_time(captured_at)}")


def frame_task_id(site: str, camera_id: str, key: str) -> uuid.UUID:
    """UUIDv5 of site, camera and a key naming the frame within that camera (a file's path and content
    hash, a video's identity and frame index): the same frame gives the same task id on every run."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"detfleet:{site}/{camera_id}#{key}")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_ms(moment: datetime) -> int:
    """Whole milliseconds since the Unix epoch: the value of :data:`H_PUBLISHED_AT`."""
    return (moment.astimezone(UTC) - _EPOCH) // timedelta(milliseconds=1)


def from_epoch_ms(value: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=value)


class Task(BaseModel):
    """One detection task, schema version 1. Frozen: a retry is a new value with ``attempt + 1``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    task_id: uuid.UUID
    lane: Lane
    site: str = Field(pattern=NAME_PATTERN)
    camera_id: str = Field(pattern=NAME_PATTERN)
    captured_at: AwareDatetime
    trace_id: str = Field(min_length=1, max_length=128)
    attempt: int = Field(1, ge=1, le=1000)
    deadline: AwareDatetime | None = None
    producer: str | None = Field(None, max_length=255)
    published_at: AwareDatetime | None = None

    @field_validator("trace_id", "producer")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # Postgres text cannot hold NUL: a row carrying one could never be written.
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("captured_at", "deadline", "published_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    @property
    def routing_key(self) -> str:
        return routing_key(self.lane, self.site, self.camera_id)

    def past_deadline(self, now: datetime) -> bool:
        return self.deadline is not None and now >= self.deadline

    def next_attempt(self) -> Task:
        return self.model_copy(update={"attempt": self.attempt + 1})

    def headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {
            H_SCHEMA: SCHEMA_VERSION,
            H_CAMERA: self.camera_id,
            H_SITE: self.site,
            H_CAPTURED_AT: format_time(self.captured_at),
            H_TRACE_ID: self.trace_id,
            H_ATTEMPT: self.attempt,
        }
        if self.deadline is not None:
            headers[H_DEADLINE] = format_time(self.deadline)
        return headers

    def to_envelope(self, body: bytes, expiration_ms: int | None = None) -> Envelope:
        """The AMQP message of this task, published now unless ``published_at`` says otherwise;
        ``expiration_ms`` only for a first publish to realtime."""
        published = self.published_at or datetime.now(UTC)
        return Envelope(
            body=body,
            routing_key=self.routing_key,
            message_id=str(self.task_id),
            timestamp=published,
            app_id=self.producer,
            expiration_ms=expiration_ms,
            headers={**self.headers(), H_PUBLISHED_AT: epoch_ms(published)},
        )

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> Task:
        """Validate a received message; anything off the contract raises :class:`TaskValidationError`."""
        headers = envelope.headers
        _check_schema(headers)
        lane, site, camera = _split_routing_key(envelope.routing_key)
        raw = {
            "task_id": _required_text(envelope.message_id, "message_id property"),
            "lane": lane,
            "site": _header_text(headers, H_SITE),
            "camera_id": _header_text(headers, H_CAMERA),
            "captured_at": _header_time(headers, H_CAPTURED_AT),
            "trace_id": _header_text(headers, H_TRACE_ID),
            "attempt": _header_int(headers, H_ATTEMPT),
            "deadline": _header_time(headers, H_DEADLINE, required=False),
            "producer": envelope.app_id,
            "published_at": _published_at(envelope),
        }
        task = _validated(raw)
        if (task.site, task.camera_id) != (site, camera):
            raise TaskValidationError(
                f"headers site/camera_id {task.site}/{task.camera_id} disagree with routing key "
                f"{envelope.routing_key!r}"
            )
        return task


def realtime_deadline(captured_at: datetime, budget_ms: int) -> datetime:
    return captured_at + timedelta(milliseconds=budget_ms)


def stamp_published(envelope: Envelope, moment: datetime) -> Envelope:
    """``envelope`` as sent at ``moment``: the timestamp property and :data:`H_PUBLISHED_AT` set to it."""
    return replace(envelope, timestamp=moment, headers={**envelope.headers, H_PUBLISHED_AT: epoch_ms(moment)})


def _published_at(envelope: Envelope) -> datetime | None:
    """The millisecond header where the producer sent one, else the whole-second timestamp property."""
    value = envelope.headers.get(H_PUBLISHED_AT)
    if value is None:
        return _aware(envelope.timestamp)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskValidationError(
            f"header {H_PUBLISHED_AT} must be an integer (milliseconds since the Unix epoch), "
            f"got {quoted(value)}"
        )
    try:
        if value < 0:
            raise OverflowError
        return from_epoch_ms(value)
    except OverflowError:
        raise TaskValidationError(f"header {H_PUBLISHED_AT} is out of range, got {quoted(value)}") from None


def _aware(moment: datetime | None) -> datetime | None:
    """AMQP timestamps carry no zone: they are UTC seconds."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def quoted(value: object) -> str:
    """``repr(value)`` for a reason, cut to :data:`QUOTE_LIMIT` characters with the full length named."""
    text = repr(value)
    if len(text) <= QUOTE_LIMIT:
        return text
    return f"{text[:QUOTE_LIMIT]}... ({len(text)} characters)"


def _validated(raw: dict[str, Any]) -> Task:
    try:
        return Task.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TaskValidationError(f"{where}: {first['msg']} (got {quoted(first.get('input'))})") from None


def _check_schema(headers: Mapping[str, Any]) -> None:
    version = headers.get(H_SCHEMA)
    if version is None:
        raise TaskValidationError(f"header {H_SCHEMA} is missing")
    if isinstance(version, bool) or not isinstance(version, int):
        raise TaskValidationError(f"header {H_SCHEMA} must be an integer, got {quoted(version)}")
    if version > SCHEMA_VERSION:
        raise UnsupportedSchemaError(f"unsupported schema {version}")
    if version != SCHEMA_VERSION:
        raise TaskValidationError(f"unknown schema version {version}")


def _split_routing_key(key: str) -> tuple[str, str, str]:
    parts = key.split(".")
    if len(parts) != 3 or parts[0] not in LANES:
        raise TaskValidationError(f"routing key must be <lane>.<site>.<camera>, got {quoted(key)}")
    return parts[0], parts[1], parts[2]


def _required_text(value: object, what: str) -> str:
    if value is None or value == "":
        raise TaskValidationError(f"{what} is missing")
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise TaskValidationError(f"{what} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise TaskValidationError(f"{what} must be text, got {type(value).__name__}")
    return value


def _header_text(headers: Mapping[str, Any], name: str) -> str:
    return _required_text(headers.get(name), f"header {name}")


def _header_int(headers: Mapping[str, Any], name: str) -> int:
    value = headers.get(name, 1)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskValidationError(f"header {name} must be an integer, got {quoted(value)}")
    return value


def _header_time(headers: Mapping[str, Any], name: str, required: bool = True) -> datetime | None:
    if not required and headers.get(name) is None:
        return None
    text = _header_text(headers, name)
    try:
        return parse_time(text)
    except ValueError:
        raise TaskValidationError(
            f"header {name} must be an RFC 3339 time with zone, got {quoted(text)}"
        ) from None


def dead_letter_copy(envelope: Envelope, reason: str, attempt: int, failed_at: datetime) -> Envelope:
    """The DLQ entry of a failed message: its body and headers, plus why, where from and when."""
    return envelope.republished(
        **{
            H_REASON: reason,
            H_ORIGINAL_EXCHANGE: envelope.headers.get(H_ORIGINAL_EXCHANGE, envelope.exchange),
            H_ORIGINAL_ROUTING_KEY: envelope.headers.get(H_ORIGINAL_ROUTING_KEY, envelope.routing_key),
            H_ATTEMPT: attempt,
            H_FAILED_AT: format_time(failed_at),
        }
    )


def replay_copy(envelope: Envelope) -> Envelope:
    """A DLQ entry made fit to publish again: dead-letter headers gone, attempts reset, back to its key."""
    clean = envelope.republished()
    headers = {k: v for k, v in clean.headers.items() if k not in DEAD_LETTER_HEADERS}
    key = envelope.headers.get(H_ORIGINAL_ROUTING_KEY, envelope.routing_key)
    routing = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
    return replace(clean, headers={**headers, H_ATTEMPT: 1}, routing_key=routing)
