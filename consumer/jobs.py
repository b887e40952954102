"""One received message on its way through the worker, and the checks made before any decoding."""

from __future__ import annotations

import hashlib
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
from shared.errors import FrameRejectedError, TaskValidationError
from shared.frames import inspect_frame
from shared.schema import BROKER_DEATH_HEADERS, Envelope, Task
from shared.topology import QUEUE_INTAKE

# Names the result row of a message that carries no usable task id (see derived_task_id).
DERIVED_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "detfleet:message-without-task-id")

# Set on a message whose AMQP properties the client library could not decode, by the quarantine sweep
# that moved a sanitised copy back into the worker's reach.
QUARANTINE_HEADER = "x-detfleet-quarantined"


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

    @property
    def needs_inference(self) -> bool:
        return self.outcome is None

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


def task_id_of(job: Job) -> uuid.UUID:
    """The key of the message's row: the task id, else its message_id when that is a UUID at all, else
    :func:`derived_task_id`. Every message gets a row, so a bad one is never only a DLQ entry."""
    if job.task is not None:
        return job.task.task_id
    envelope = job.delivery.envelope
    try:
        return uuid.UUID(str(envelope.message_id))
    except ValueError:
        return derived_task_id(envelope)


def derived_task_id(envelope: Envelope) -> uuid.UUID:
    """A UUIDv5 of everything a message carries (body, routing key, properties, headers): the same for every
    redelivery of it, so the sink absorbs them as redeliveries, and different for any other message.

    The broker's death headers are left out: the same message read back from the intake keeps its key.
    """
    headers = sorted(
        (repr(key), repr(value)) for key, value in envelope.headers.items() if key not in BROKER_DEATH_HEADERS
    )
    properties = (envelope.message_id, envelope.timestamp, envelope.app_id, envelope.content_type)
    digest = hashlib.sha256()
    for part in (envelope.routing_key, repr(properties), repr(headers)):
        digest.update(part.encode("utf-8", "backslashreplace") + b"\0")
    digest.update(envelope.body)
    return uuid.uuid5(DERIVED_ID_NAMESPACE, digest.hexdigest())


def _ms(start: datetime | None, end: datetime) -> float | None:
    return None if start is None else max(0.0, (end - start).total_seconds() * 1000)


def build_row(
    job: Job, action: Action, model: ModelInfo, consumer_id: str, now: datetime
) -> ResultRow | None:
    """The result row an action writes, or None for an action that writes none (retry, requeue)."""
    if action.status is None:
        return None
    task_id = task_id_of(job)
    task, outcome = job.task, job.outcome
    ok = outcome if isinstance(outcome, Ok) else None
    published = task.published_at if task else None
    return ResultRow(
        task_id=task_id,
        camera_id=task.camera_id if task else None,
        site=task.site if task else None,
        lane=task.lane if task else None,
        captured_at=task.captured_at if task else None,
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
        sink_ms=None,
        end_to_end_ms=_ms(task.captured_at if task else None, now),
        image_width=ok.width if ok else None,
        image_height=ok.height if ok else None,
        detections=[d.to_json() for d in ok.detections] if ok else None,
        trace_id=task.trace_id if task else None,
    )
