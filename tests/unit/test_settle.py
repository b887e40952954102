"""The one settle decision, and acks over the lowest contiguous run only (fake deliveries, no broker)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from consumer.acker import Acker
from consumer.outcomes import (
    BadInput,
    DroppedByBroker,
    Ok,
    Outcome,
    PastDeadline,
    SinkUnavailable,
    Transient,
    decide,
)
from shared.schema import Envelope, Task


def task(lane: str = "bulk", attempt: int = 1) -> Task:
    now = datetime.now(UTC)
    return Task(
        task_id=uuid.uuid4(),
        lane=lane,
        site="s",
        camera_id="c",
        captured_at=now,
        trace_id="t",
        attempt=attempt,
    )


@pytest.mark.parametrize(
    ("outcome", "lane", "expected"),
    [
        (Ok((), 640, 480), "bulk", {"status": "ok", "dead_letter": False, "requeue": False}),
        (BadInput("corrupt"), "bulk", {"status": "failed", "reason": "corrupt", "dead_letter": True}),
        (SinkUnavailable("down"), "bulk", {"status": None, "requeue": True, "dead_letter": False}),
        (PastDeadline(), "realtime", {"status": "shed", "reason": "deadline exceeded", "dead_letter": False}),
        (PastDeadline(), "bulk", {"status": "failed", "reason": "deadline exceeded", "dead_letter": True}),
        (DroppedByBroker("expired"), "realtime", {"status": "shed", "dead_letter": False}),
        (DroppedByBroker("expired"), "bulk", {"status": "failed", "dead_letter": True}),
    ],
)
def test_each_outcome_has_its_action(outcome: Outcome, lane: str, expected: dict[str, Any]) -> None:
    action = decide(outcome, task(lane), max_retries=3)
    assert {k: getattr(action, k) for k in expected} == expected


def test_a_transient_failure_retries_with_the_next_attempt_until_the_limit() -> None:
    first = decide(Transient("boom"), task(attempt=1), max_retries=3)
    assert first.retry is not None
    assert first.retry.attempt == 2
    assert first.status is None
    last = decide(Transient("boom"), task(attempt=4), max_retries=3)
    assert last.retry is None
    assert (last.status, last.dead_letter) == ("failed", True)
    assert last.reason == "boom (gave up after 4 attempts)"


def test_an_invalid_message_is_never_retried() -> None:
    action = decide(Transient("boom"), None, max_retries=3)
    assert action.retry is None
    assert action.dead_letter


class FakeDelivery:
    """Records what the acker sent for one delivery tag."""

    def __init__(self, tag: int, sent: list[tuple[str, int, bool]]) -> None:
        self.delivery_tag = tag
        self.envelope = Envelope(body=b"", routing_key="bulk.s.c")
        self._sent = sent

    async def ack(self, multiple: bool = False) -> bool:
        self._sent.append(("ack", self.delivery_tag, multiple))
        return True

    async def requeue(self) -> bool:
        self._sent.append(("requeue", self.delivery_tag, False))
        return True


def deliveries(count: int) -> tuple[Acker, list[Any], list[tuple[str, int, bool]]]:
    sent: list[tuple[str, int, bool]] = []
    acker = Acker()
    made = [FakeDelivery(tag, sent) for tag in range(1, count + 1)]
    for delivery in made:
        acker.track(delivery)  # type: ignore[arg-type]
    return acker, made, sent


async def test_acks_wait_for_every_lower_tag_then_go_out_as_one_multiple_ack() -> None:
    acker, d, sent = deliveries(5)
    await acker.ack(d[2])
    await acker.ack(d[1])
    assert sent == []  # tag 1 is still in flight: acking 2 or 3 with multiple would cover it
    await acker.ack(d[0])
    assert sent == [("ack", 3, True)]
    await acker.ack(d[3])
    assert sent[-1] == ("ack", 4, False)
    assert len(acker) == 1


async def test_a_batch_settled_without_flushing_goes_out_as_one_ack_frame() -> None:
    acker, d, sent = deliveries(16)
    for delivery in d:
        await acker.ack(delivery, flush=False)
    assert sent == []
    await acker.flush()
    assert sent == [("ack", 16, True)]
    assert acker.ack_frames == 1
    assert len(acker) == 0


async def test_requeue_all_also_sends_the_acks_still_waiting_for_a_flush() -> None:
    acker, d, sent = deliveries(2)
    await acker.ack(d[0], flush=False)
    await acker.ack(d[1], flush=False)
    assert await acker.requeue_all() == 0
    assert sent == [("ack", 2, True)]


async def test_a_requeue_goes_out_at_once_and_unblocks_the_run_behind_it() -> None:
    acker, d, sent = deliveries(3)
    await acker.ack(d[1])
    await acker.ack(d[2])
    await acker.requeue(d[0])
    assert sent == [("requeue", 1, False), ("ack", 3, True)]
    assert len(acker) == 0


async def test_requeue_all_hands_back_only_what_is_not_acked() -> None:
    acker, d, sent = deliveries(4)
    await acker.ack(d[2])
    assert await acker.requeue_all() == 3
    assert [s for s in sent if s[0] == "requeue"] == [
        ("requeue", 1, False),
        ("requeue", 2, False),
        ("requeue", 4, False),
    ]
    assert ("ack", 3, False) in sent
    assert len(acker) == 0


def test_deadline_helper_is_exact() -> None:
    t = task()
    moment = datetime.now(UTC)
    assert not t.past_deadline(moment)
    late = t.model_copy(update={"deadline": moment - timedelta(milliseconds=1)})
    assert late.past_deadline(moment)
