"""Result event version 1: what the consumer publishes to the ``detfleet.results`` exchange per settled task.

One event per result row, published after the row is committed and before the message is acked
(docs/results.md). Delivery is at least once: a task may have more than one event (a redelivery of a task
whose row exists publishes it again), all with the same ``task_id`` and content, so subscribers dedupe by
``task_id``. The routing key is ``<status>.<site>.<camera>``; a row whose site or camera could not be read
routes with :data:`UNKNOWN` in their place.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from shared.errors import TaskValidationError
from shared.schema import H_SCHEMA, Envelope, check_name

EVENT_VERSION: Literal[1] = 1
STATUSES = ("ok", "failed", "shed")
UNKNOWN = "unknown"
CONTENT_TYPE = "application/json"

EventStatus = Literal["ok", "failed", "shed"]


class ResultEvent(BaseModel):
    """One task's result as subscribers see it; the fields are those of its row (docs/results.md)."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # a newer minor field must not break readers

    version: Literal[1] = EVENT_VERSION
    task_id: uuid.UUID
    status: EventStatus
    reason: str | None = None
    site: str | None = None
    camera_id: str | None = None
    lane: str | None = None
    captured_at: AwareDatetime | None = None
    completed_at: AwareDatetime
    detections: list[dict[str, Any]] | None = None
    model_name: str | None = None
    model_sha256: str | None = None
    end_to_end_ms: float | None = None
    trace_id: str | None = None
    attempt: int = Field(1, ge=1)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ResultEvent:
        """The event of a result row: a ``detfleet_results`` record or a row dataclass as a mapping."""
        detections = row.get("detections")
        if isinstance(detections, str):  # asyncpg hands jsonb back as text
            detections = json.loads(detections)
        values = {k: row[k] for k in cls.model_fields if row.get(k) is not None}
        return cls.model_validate({**values, "detections": detections})

    @classmethod
    def from_json(cls, body: bytes) -> ResultEvent:
        """Parse an event body, or raise :class:`TaskValidationError` naming what is wrong."""
        try:
            return cls.model_validate_json(body)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()
            )
            raise TaskValidationError(f"not a result event: {problems}") from error

    @property
    def routing_key(self) -> str:
        return event_routing_key(self.status, self.site, self.camera_id)

    def to_envelope(self) -> Envelope:
        """The AMQP message of this event: persistent, JSON, ``message_id`` the task id."""
        return Envelope(
            body=self.model_dump_json().encode(),
            routing_key=self.routing_key,
            message_id=str(self.task_id),
            timestamp=self.completed_at,
            content_type=CONTENT_TYPE,
            headers={H_SCHEMA: EVENT_VERSION},
        )


def event_routing_key(status: str, site: str | None, camera_id: str | None) -> str:
    """``<status>.<site>.<camera>``; a missing or unroutable name becomes :data:`UNKNOWN`."""
    return f"{status}.{_routable(site)}.{_routable(camera_id)}"


def binding_key(status: str | None = None, site: str | None = None, camera_id: str | None = None) -> str:
    """The topic pattern matching events of ``status``, ``site`` and ``camera_id`` (None: any)."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    parts = [status, _checked("site", site), _checked("camera", camera_id)]
    return ".".join(p if p is not None else "*" for p in parts)


def _checked(kind: str, value: str | None) -> str | None:
    return None if value is None else check_name(kind, value)


def _routable(name: str | None) -> str:
    if name is None:
        return UNKNOWN
    try:
        return check_name("name", name)
    except ValueError:
        return UNKNOWN
