"""Wire contract v1: round trip, every malformed case a readable validation error, header clean-up."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import asyncapi
from shared.errors import TaskValidationError, UnsupportedSchemaError
from shared.schema import (
    H_ATTEMPT,
    H_CAPTURED_AT,
    H_PUBLISHED_AT,
    H_REASON,
    H_SCHEMA,
    Envelope,
    Task,
    dead_letter_copy,
    deterministic_task_id,
    format_time,
    frame_task_id,
    replay_copy,
    routing_key,
    stamp_published,
)

CAPTURED = datetime(2026, 11, 23, 8, 0, 0, 123000, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))
names = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


def make_task(**changes: Any) -> Task:
    fields: dict[str, Any] = {
        "task_id": uuid.uuid4(),
        "lane": "realtime",
        "site": "plant-1",
        "camera_id": "cam_07",
        "captured_at": CAPTURED,
        "trace_id": "trace-abc",
        "deadline": CAPTURED + timedelta(seconds=10),
        "producer": "gateway-3",
        "published_at": CAPTURED.replace(microsecond=0),
    }
    return Task(**{**fields, **changes})


def envelope_of(task: Task, **header_changes: Any) -> Envelope:
    envelope = task.to_envelope(b"\xff\xd8\xff body")
    headers = {k: v for k, v in {**envelope.headers, **header_changes}.items() if v is not ...}
    return replace(envelope, headers=headers)


def test_a_task_survives_the_round_trip() -> None:
    task = make_task()
    assert Task.from_envelope(task.to_envelope(b"x")) == task


@given(site=names, camera=names, lane=st.sampled_from(["realtime", "bulk"]), attempt=st.integers(1, 1000))
def test_round_trip_holds_for_any_valid_names(site: str, camera: str, lane: str, attempt: int) -> None:
    task = make_task(site=site, camera_id=camera, lane=lane, attempt=attempt, deadline=None)
    assert Task.from_envelope(task.to_envelope(b"x")) == task


def test_the_message_carries_the_contract() -> None:
    task = make_task()
    envelope = task.to_envelope(b"body")
    assert envelope.routing_key == "realtime.plant-1.cam_07"
    assert envelope.message_id == str(task.task_id)
    assert envelope.delivery_mode == 2
    assert envelope.app_id == "gateway-3"
    assert envelope.headers == {
        "x-detfleet-schema": 1,
        "camera_id": "cam_07",
        "site": "plant-1",
        "captured_at": "2026-11-23T08:00:00.123Z",
        "trace_id": "trace-abc",
        "x-detfleet-attempt": 1,
        "x-detfleet-deadline": "2026-11-23T08:00:10.123Z",
        "x-detfleet-published-at": 1795420800000,
    }


def test_published_at_comes_from_the_millisecond_header_not_the_whole_second_property() -> None:
    sent = datetime(2026, 11, 23, 8, 0, 1, 987000, tzinfo=UTC)
    envelope = stamp_published(make_task().to_envelope(b"x"), sent)
    # The broker's timestamp property keeps whole seconds: what a consumer would see without the header.
    envelope = replace(envelope, timestamp=sent.replace(microsecond=0, tzinfo=None))
    assert envelope.headers[H_PUBLISHED_AT] == 1795420801987
    assert Task.from_envelope(envelope).published_at == sent


def test_without_the_header_published_at_falls_back_to_the_timestamp_property() -> None:
    envelope = envelope_of(make_task(), **{H_PUBLISHED_AT: ...})
    envelope = replace(envelope, timestamp=datetime(2026, 11, 23, 8, 0, 1))
    assert Task.from_envelope(envelope).published_at == datetime(2026, 11, 23, 8, 0, 1, tzinfo=UTC)


def test_a_message_without_the_attempt_header_is_a_first_attempt() -> None:
    """Lenient where it costs nothing: a gateway need not send x-detfleet-attempt at all."""
    assert Task.from_envelope(envelope_of(make_task(), **{H_ATTEMPT: ...})).attempt == 1


def test_frame_keys_give_the_same_id_for_the_same_frame_and_another_for_any_other() -> None:
    first = frame_task_id("plant-1", "cam_07", "file:a.jpg:abc")
    assert first == frame_task_id("plant-1", "cam_07", "file:a.jpg:abc")
    assert len({first, frame_task_id("plant-1", "cam_08", "file:a.jpg:abc")}) == 2
    assert first != frame_task_id("plant-1", "cam_07", "file:a.jpg:abd")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"message_id": None}, "message_id property is missing"),
        ({"message_id": "not-a-uuid"}, "task_id"),
        ({"message_id": b"\xff\xfe"}, "message_id property is not UTF-8"),
        ({"routing_key": "realtime.plant-1"}, "routing key must be <lane>.<site>.<camera>"),
        ({"routing_key": "urgent.plant-1.cam_07"}, "routing key must be <lane>.<site>.<camera>"),
    ],
)
def test_malformed_properties_are_readable_validation_errors(change: dict[str, Any], expected: str) -> None:
    envelope = replace(make_task().to_envelope(b"x"), **change)
    with pytest.raises(TaskValidationError, match=expected):
        Task.from_envelope(envelope)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({H_SCHEMA: ...}, "header x-detfleet-schema is missing"),
        ({H_SCHEMA: "1"}, "header x-detfleet-schema must be an integer"),
        ({H_SCHEMA: 0}, "unknown schema version 0"),
        ({"camera_id": ...}, "header camera_id is missing"),
        ({"camera_id": 7}, "header camera_id must be text"),
        ({"site": b"pl\xe4nt"}, "header site is not UTF-8 text"),
        ({"camera_id": "cam.07"}, "camera_id"),
        ({"camera_id": "cam_08"}, "disagree with routing key"),
        ({H_CAPTURED_AT: "yesterday"}, "header captured_at must be an RFC 3339 time"),
        ({H_CAPTURED_AT: "2026-11-23T08:00:00"}, "header captured_at must be an RFC 3339 time with zone"),
        ({H_ATTEMPT: "2"}, "header x-detfleet-attempt must be an integer"),
        ({H_ATTEMPT: 0}, "attempt"),
        ({"trace_id": ""}, "header trace_id is missing"),
        ({"x-detfleet-deadline": 12}, "header x-detfleet-deadline must be text"),
        ({H_PUBLISHED_AT: "1795420800000"}, "header x-detfleet-published-at must be an integer"),
        ({H_PUBLISHED_AT: 1.5}, "header x-detfleet-published-at must be an integer"),
        ({H_PUBLISHED_AT: True}, "header x-detfleet-published-at must be an integer"),
        ({H_PUBLISHED_AT: 10**20}, "header x-detfleet-published-at is out of range"),
        ({H_PUBLISHED_AT: -1}, "header x-detfleet-published-at is out of range"),
    ],
)
def test_malformed_headers_are_readable_validation_errors(headers: dict[str, Any], expected: str) -> None:
    with pytest.raises(TaskValidationError, match=expected) as caught:
        Task.from_envelope(envelope_of(make_task(), **headers))
    assert "\n" not in str(caught.value)


def test_a_newer_schema_is_unsupported_not_malformed() -> None:
    with pytest.raises(UnsupportedSchemaError, match="^unsupported schema 2$"):
        Task.from_envelope(envelope_of(make_task(), **{H_SCHEMA: 2}))


@pytest.mark.parametrize("bad", ["", "a.b", "cam#", "*", "x" * 65, "caméra"])
def test_routing_key_refuses_names_that_break_topic_routing(bad: str) -> None:
    with pytest.raises(ValueError, match=r"\[A-Za-z0-9_-\]"):
        routing_key("bulk", bad, "cam")


def test_deterministic_ids_dedupe_a_resent_frame() -> None:
    first = deterministic_task_id("plant-1", "cam_07", CAPTURED)
    assert first == deterministic_task_id("plant-1", "cam_07", CAPTURED.astimezone(PLUS_TWO))
    assert first != deterministic_task_id("plant-1", "cam_07", CAPTURED + timedelta(milliseconds=1))


def test_times_are_rfc3339_utc_with_milliseconds() -> None:
    assert format_time(CAPTURED.astimezone(PLUS_TWO)) == "2026-11-23T08:00:00.123Z"


def test_republish_drops_broker_death_headers_and_expiration() -> None:
    envelope = replace(
        make_task().to_envelope(b"x", expiration_ms=5000),
        headers={"x-death": [{"count": 1}], "x-first-death-reason": "expired", "camera_id": "cam_07"},
        redelivered=True,
    )
    again = envelope.republished(**{H_ATTEMPT: 2})
    assert again.headers == {"camera_id": "cam_07", H_ATTEMPT: 2}
    assert again.expiration_ms is None
    assert not again.redelivered


def test_a_dead_letter_copy_says_why_and_where_from_and_replay_undoes_it() -> None:
    original = replace(make_task().to_envelope(b"x"), exchange="detfleet.frames", headers={"x-death": []})
    failed_at = CAPTURED + timedelta(minutes=1)
    copy = dead_letter_copy(original, "corrupt JPEG", attempt=4, failed_at=failed_at)
    assert copy.headers[H_REASON] == "corrupt JPEG"
    assert copy.headers["x-detfleet-original-exchange"] == "detfleet.frames"
    assert copy.headers["x-detfleet-original-routing-key"] == "realtime.plant-1.cam_07"
    assert copy.headers[H_ATTEMPT] == 4
    assert copy.headers["x-detfleet-failed-at"] == "2026-11-23T08:01:00.123Z"
    assert "x-death" not in copy.headers

    replayed = replay_copy(replace(copy, routing_key="", exchange="detfleet.dlq"))
    assert replayed.routing_key == "realtime.plant-1.cam_07"
    assert replayed.headers == {H_ATTEMPT: 1}


@pytest.mark.parametrize("headers", [{"trace_id": "tr\x00ce"}, {"trace_id": "\x00"}])
def test_a_nul_character_in_a_stored_text_is_refused(headers: dict[str, Any]) -> None:
    """Postgres text cannot hold NUL: such a task must fail as bad input, never reach the sink."""
    with pytest.raises(TaskValidationError, match=r"trace_id: .*must not contain NUL"):
        Task.from_envelope(envelope_of(make_task(), **headers))


def test_a_nul_in_the_producer_name_is_refused() -> None:
    envelope = replace(make_task().to_envelope(b"\xff\xd8\xff body"), app_id="gate\x00way")
    with pytest.raises(TaskValidationError, match=r"producer: .*must not contain NUL"):
        Task.from_envelope(envelope)


@pytest.mark.parametrize(
    "headers",
    [
        {"camera_id": "c" * 60_000},
        {"trace_id": "t" * 60_000},
        {H_CAPTURED_AT: "y" * 60_000},
        {H_ATTEMPT: ["a" * 60_000]},
        {H_SCHEMA: "1" * 60_000},
    ],
)
def test_a_reason_quotes_a_huge_value_only_in_part(headers: dict[str, Any]) -> None:
    """The reason goes into a DLQ header next to the original headers: quoting 60 kB whole would push the
    copy past the broker's frame size."""
    with pytest.raises(TaskValidationError) as caught:
        Task.from_envelope(envelope_of(make_task(), **headers))
    reason = str(caught.value)
    assert len(reason) < 300
    assert "characters)" in reason


ASYNCAPI = Path(__file__).parents[2] / "docs" / "asyncapi.json"


def test_the_published_asyncapi_document_is_the_one_the_schema_module_generates() -> None:
    assert ASYNCAPI.read_text() == asyncapi.render(), "run: python -m shared.asyncapi > docs/asyncapi.json"


def test_the_documented_headers_are_those_the_consumer_requires_and_reads() -> None:
    headers = json.loads(ASYNCAPI.read_text())["components"]["messages"]["frame"]["headers"]
    envelope = make_task().to_envelope(b"x")
    assert set(envelope.headers) == set(headers["properties"])
    for name in headers["properties"]:
        without = envelope_of(make_task(), **{name: ...})
        if name in headers["required"]:
            with pytest.raises(TaskValidationError, match=name):
                Task.from_envelope(without)
        else:
            Task.from_envelope(without)
