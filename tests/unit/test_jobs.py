"""Admission and result rows of messages that are off the contract (no broker, no database)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from consumer.acker import Acker
from consumer.detector.fake import fake_model_info
from consumer.jobs import Job, admit, build_row
from consumer.outcomes import BadInput, decide
from consumer.sink import ResultRow
from shared.broker.aio import Delivery
from shared.schema import Envelope, Task, dead_letter_copy, replay_copy
from shared.topology import QUEUE_BULK

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def valid_envelope(**changes: Any) -> Envelope:
    task = Task(
        task_id=uuid.uuid4(),
        lane="bulk",
        site="site-a",
        camera_id="cam-1",
        captured_at=NOW,
        trace_id="trace-1",
    )
    return dataclasses.replace(task.to_envelope(b"\xff\xd8\xff not decoded here"), **changes)


def failed_row(envelope: Envelope) -> ResultRow:
    """What the worker writes for ``envelope`` after admission decided it is bad input."""
    job = Job(Delivery(envelope, QUEUE_BULK, 1, None), Acker())  # type: ignore[arg-type]
    admit(job)
    assert isinstance(job.outcome, BadInput), job.outcome
    row = build_row(job, decide(job.outcome, job.task, 3), fake_model_info(), "worker-1", NOW)
    assert row is not None
    return row


@pytest.mark.parametrize("message_id", [None, "", "frame-17", "not-a-uuid-at-all"])
def test_a_message_without_a_uuid_message_id_still_gets_a_failed_row(message_id: str | None) -> None:
    row = failed_row(valid_envelope(message_id=message_id))

    assert row.status == "failed"
    assert "message_id" in (row.reason or "") or "task_id" in (row.reason or "")


def test_the_derived_row_key_is_the_same_for_every_redelivery_and_differs_between_messages() -> None:
    first = valid_envelope(message_id=None)
    redelivered = dataclasses.replace(first, redelivered=True, headers={**first.headers, "x-death": []})
    # Its DLQ entry, replayed: dead-letter headers gone, attempt reset to 1.
    replayed = dataclasses.replace(replay_copy(dead_letter_copy(first, "bad", 1, NOW)), exchange="")
    other_body = dataclasses.replace(first, body=first.body + b"!")
    other_headers = dataclasses.replace(first, headers={**first.headers, "camera_id": "cam-2"})
    other_id = dataclasses.replace(first, message_id="frame-17")

    key = failed_row(first).task_id

    assert failed_row(redelivered).task_id == key
    assert failed_row(replayed).task_id == key
    assert len({key, *(failed_row(e).task_id for e in (other_body, other_headers, other_id))}) == 4


@pytest.mark.parametrize(
    ("broken", "value"),
    [("captured_at", "yesterday"), ("camera_id", b"\xff"), ("x-detfleet-attempt", -5), ("site", 7)],
)
def test_a_failed_row_keeps_every_field_that_could_be_read(broken: str, value: object) -> None:
    good = valid_envelope(app_id="gateway-7")
    row = failed_row(dataclasses.replace(good, headers={**good.headers, broken: value}))

    assert row.status == "failed"
    assert (row.camera_id, row.site, row.lane) == ("cam-1", "site-a", "bulk")  # routing key fills in
    assert row.trace_id == "trace-1"
    assert row.producer == "gateway-7"
    assert row.captured_at == (None if broken == "captured_at" else NOW)


def test_a_uuid_message_id_of_an_invalid_task_keys_its_row() -> None:
    task_id = uuid.uuid4()
    envelope = valid_envelope(message_id=str(task_id), headers={"x-detfleet-schema": 1})

    assert failed_row(envelope).task_id == task_id
