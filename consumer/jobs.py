"""One received message on its way through the worker, and the checks made before any decoding."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from consumer.acker import Acker
from consumer.detector.base import DecodedFrame, ModelInfo
from consumer.outcomes import Action, BadInput, DroppedByBroker, Ok, Outcome, PastDeadline
from consumer.sink import ResultRow
from shared.broker.aio import Delivery
from shared.broker.quarantine import QUARANTINE_HEADER
from shared.errors import FrameRejectedError, TaskValidationError
from shared.frames import inspect_frame
from shared.schema import (
    BROKER_DEATH_HEADERS,
    DEAD_LETTER_HEADERS,
    H_ATTEMPT,
    H_CAMERA,
    H_CAPTURED_AT,
    H_ORIGINAL_ROUTING_KEY,
    H_SITE,
    H_TRACE_ID,
    LANES,
    NAME_PATTERN,
    Envelope,
    Task,
    parse_time,
)
from shared.topology import QUEUE_INTAKE

# Names the result row of a message that carries no usable task id (see derived_task_id).
DERIVED_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "detfleet:message-without-task-id")
_NAME = re.compile(NAME_PATTERN)


@dataclass
class Job:
    delivery: Delivery
    acker: Acker
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    received_mono: float = field(default_factory=time.monotonic)
    task: Task | None = None
    outcome: Outcome | None = None
    image: DecodedFrame | None = None
    batch_started: datetime | None = None
    decode_ms: float | None = None
    inference_ms: float | None = None
    marked: bool = False  # in progress in the attempts table (a redelivery): settling clears the mark

    @property
    def needs_inference(self) -> bool:
        return self.outcome is None

    @property
    def redelivered(self) -> bool:
        """The broker handed this message out before: a consumer may have died with it in hand."""
        return self.delivery.envelope.redelivered

    @property
    def camera_id(self) -> str | None:
        """The camera, from the task or, for a message off the contract, what could be read of it."""
        return self.task.camera_id if self.task else readable_fields(self.delivery.envelope).camera_id

    @property
    def task_id(self) -> uuid.UUID:
        """The key of the message's row and of its DLQ entry (see :func:`task_id_of`)."""
        return task_id_of(self.delivery.envelope, self.task)

    def held_for(self, now_mono: float) -> float:
        return now_mono - self.received_mono


def admit(job: Job) -> None:
    """Validate a fresh delivery: set ``job.task``, and ``job.outcome`` when it needs no inference."""
    envelope = job.delivery.envelope
    quarantined = envelope.headers.get(QUARANTINE_HEADER)
    try:
        job.task = Task.from_envelope(envelope)
    except TaskValidationError as error:
        job.outcome = BadInput(str(quarantined or error))
        return
    if quarantined:
        job.outcome = BadInput(f"malformed AMQP properties: {quarantined!s}")
    elif job.delivery.queue == QUEUE_INTAKE:
        job.outcome = DroppedByBroker(broker_drop_reason(envelope.headers))
    else:
        try:
            inspect_frame(envelope.body)
        except FrameRejectedError as error:
            job.outcome = BadInput(str(error))


def check_deadline(job: Job, now: datetime) -> None:
    """At batch start: a task whose deadline passed while it waited is not worth inferring."""
    if job.outcome is None and job.task is not None and job.task.past_deadline(now):
        job.outcome = PastDeadline()


def broker_drop_reason(headers: Any) -> str:
    """Plain words for the newest ``x-death`` entry RabbitMQ added when it dead-lettered a lane message."""
    deaths = headers.get("x-death") or []
    if not deaths:
        return "dead-lettered by the broker (no x-death header)"
    death = deaths[0]
    reason, queue = _text(death.get("reason")), _text(death.get("queue"))
    if reason == "expired":
        return f"expired in {queue}: waited longer than the queue's TTL"
    if reason == "maxlen":
        return f"pushed out of {queue}: the queue was full"
    return f"dead-lettered from {queue}: {reason}"


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def task_id_of(envelope: Envelope, task: Task | None) -> uuid.UUID:
    """The key of the message's row: the task id, else its message_id when that is a UUID at all, else
    :func:`derived_task_id`. Every message gets a row, so a bad one is never only a DLQ entry."""
    if task is not None:
        return task.task_id
    try:
        return uuid.UUID(str(envelope.message_id))
    except ValueError:
        return derived_task_id(envelope)


def derived_task_id(envelope: Envelope) -> uuid.UUID:
    """A UUIDv5 of what the message carries (body, routing key, properties, headers): the same on every
    delivery of it and in its DLQ entry (whose message_id is set to it), different for any other message.

    What the broker and settling add or change is left out: death headers, the DLQ copy's headers and the
    attempt (a replay resets it). The client never sees a message the quarantine sweep moves aside, only its
    sanitised copy, whose id is as stable as any other message's.
    """
    volatile = {*BROKER_DEATH_HEADERS, *DEAD_LETTER_HEADERS, H_ATTEMPT}
    headers = sorted((repr(k), repr(v)) for k, v in envelope.headers.items() if k not in volatile)
    properties = (envelope.message_id, envelope.timestamp, envelope.app_id, envelope.content_type)
    digest = hashlib.sha256()
    for part in (envelope.routing_key, repr(properties), repr(headers)):
        digest.update(part.encode("utf-8", "backslashreplace") + b"\0")
    digest.update(envelope.body)
    return uuid.uuid5(DERIVED_ID_NAMESPACE, digest.hexdigest())


@dataclass(frozen=True)
class Readable:
    """What a message off the contract still says validly: its failed row keeps it, so ops can tell which
    camera sends bad frames. Each field is taken on its own; an invalid one is None."""

    camera_id: str | None = None
    site: str | None = None
    lane: str | None = None
    captured_at: datetime | None = None
    trace_id: str | None = None
    producer: str | None = None


def readable_fields(envelope: Envelope) -> Readable:
    """Camera and site from the headers, or the routing key where the headers are invalid; the lane from the
    routing key; capture time, trace id and the producer's app_id where valid."""
    parts = envelope.routing_key.split(".")
    key = parts if len(parts) == 3 else [None, None, None]
    headers = envelope.headers
    return Readable(
        camera_id=_name(headers.get(H_CAMERA)) or _name(key[2]),
        site=_name(headers.get(H_SITE)) or _name(key[1]),
        lane=key[0] if key[0] in LANES else None,
        captured_at=_time(headers.get(H_CAPTURED_AT)),
        trace_id=_short_text(headers.get(H_TRACE_ID), 128),
        producer=_short_text(envelope.app_id, 255),
    )


def _name(value: object) -> str | None:
    return value if isinstance(value, str) and _NAME.match(value) else None


def _short_text(value: object, limit: int) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= limit and "\x00" not in value:
        return value
    return None


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_time(value)
    except ValueError:
        return None


def _original_routing_key(envelope: Envelope) -> str:
    """Where a replay sends the frame back to; never a NUL, which a Postgres text column refuses."""
    key = _short_text(envelope.headers.get(H_ORIGINAL_ROUTING_KEY), 255) or envelope.routing_key
    return key.replace("\x00", "\\x00")


def _ms(start: datetime | None, end: datetime) -> float | None:
    return None if start is None else max(0.0, (end - start).total_seconds() * 1000)


def build_row(
    job: Job, action: Action, model: ModelInfo, consumer_id: str, now: datetime
) -> ResultRow | None:
    """The result row an action writes, or None for an action that writes none (retry, requeue)."""
    if action.status is None:
        return None
    task, outcome, envelope = job.task, job.outcome, job.delivery.envelope
    ok = outcome if isinstance(outcome, Ok) else None
    failed = action.status == "failed"
    seen = task or readable_fields(envelope)
    published = task.published_at if task else None
    return ResultRow(
        task_id=job.task_id,
        camera_id=seen.camera_id,
        site=seen.site,
        lane=seen.lane,
        captured_at=seen.captured_at,
        received_at=job.received_at,
        completed_at=now,
        status=action.status,
        reason=action.reason,
        attempt=task.attempt if task else 1,
        consumer_id=consumer_id,
        model_name=model.name if ok else None,
        model_sha256=model.sha256 if ok else None,
        provider=model.provider if ok else None,
        queue_wait_ms=_ms(published, job.batch_started or now),
        decode_ms=job.decode_ms,
        inference_ms=job.inference_ms,
        end_to_end_ms=_ms(seen.captured_at, now) if task else None,
        image_width=ok.width if ok else None,
        image_height=ok.height if ok else None,
        detections=[d.to_json() for d in ok.detections] if ok else None,
        trace_id=seen.trace_id,
        producer=seen.producer,
        original_routing_key=envelope.headers.get(H_ORIGINAL_ROUTING_KEY, envelope.routing_key)
        if failed
        else None,
        payload_bytes=len(envelope.body) if failed else None,
    )
