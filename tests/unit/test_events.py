"""Result events: the schema subscribers rely on, its routing keys and binding patterns."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from shared.errors import TaskValidationError
from shared.events import ResultEvent, binding_key, event_routing_key
from shared.schema import H_SCHEMA

COMPLETED = datetime(2026, 12, 2, 8, 0, 0, 123000, tzinfo=UTC)


def _row(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "task_id": uuid.UUID(int=7),
        "status": "ok",
        "reason": None,
        "site": "plant-a",
        "camera_id": "cam-1",
        "lane": "bulk",
        "captured_at": COMPLETED,
        "completed_at": COMPLETED,
        "detections": '[{"class_id": 0, "label": "scratch", "score": 0.9, "box": [1, 2, 3, 4]}]',
        "model_name": "detfleet-shapes",
        "model_sha256": "ab" * 32,
        "end_to_end_ms": 12.5,
        "trace_id": "t-1",
        "attempt": 1,
        "consumer_id": "not part of the event",
    }
    row.update(changes)
    return row


def test_an_event_carries_its_rows_fields_and_decodes_stored_detections() -> None:
    event = ResultEvent.from_row(_row())
    assert event.task_id == uuid.UUID(int=7)
    assert event.detections == [{"class_id": 0, "label": "scratch", "score": 0.9, "box": [1, 2, 3, 4]}]
    assert event.routing_key == "ok.plant-a.cam-1"
    assert "consumer_id" not in event.model_dump()


def test_the_envelope_is_json_named_by_the_task_and_round_trips() -> None:
    event = ResultEvent.from_row(_row(status="failed", reason="not an image", detections=None))
    envelope = event.to_envelope()
    assert envelope.message_id == str(event.task_id)
    assert envelope.content_type == "application/json"
    assert envelope.headers[H_SCHEMA] == 1
    assert envelope.routing_key == "failed.plant-a.cam-1"
    assert json.loads(envelope.body)["version"] == 1
    assert ResultEvent.from_json(envelope.body) == event


def test_unreadable_names_route_as_unknown() -> None:
    assert event_routing_key("failed", None, "cam.with.dots") == "failed.unknown.unknown"


def test_binding_keys_use_wildcards_for_what_is_not_filtered() -> None:
    assert binding_key() == "*.*.*"
    assert binding_key("failed") == "failed.*.*"
    assert binding_key(site="plant-a", camera_id="cam-1") == "*.plant-a.cam-1"


@pytest.mark.parametrize(("status", "site"), [("broken", None), (None, "a.b"), (None, "#")])
def test_a_bad_filter_is_refused_with_its_name(status: str | None, site: str | None) -> None:
    with pytest.raises(ValueError, match="status|site"):
        binding_key(status, site)


def test_a_body_that_is_not_an_event_names_the_missing_field() -> None:
    with pytest.raises(TaskValidationError, match="task_id"):
        ResultEvent.from_json(b'{"status": "ok", "completed_at": "2026-12-02T08:00:00Z"}')


def test_a_newer_minor_field_is_ignored_by_this_reader() -> None:
    body = ResultEvent.from_row(_row()).model_dump_json().replace('"version":1', '"version":1,"extra":2')
    assert ResultEvent.from_json(body.encode()).task_id == uuid.UUID(int=7)
