"""Settling through fake seams (no broker, no database): rows, copies, acks per channel, one DLQ entry per
failed task, the crash-loop guard, and what a refused copy or a sink outage leaves behind."""

from __future__ import annotations

import dataclasses
import itertools
import uuid

import pytest

from consumer.detector.fake import fake_model_info
from consumer.jobs import Job
from consumer.metrics import ConsumerMetrics
from consumer.outcomes import (
    BadInput,
    Crashed,
    DroppedByBroker,
    Ok,
    Outcome,
    OutOfMemory,
    PastDeadline,
    SinkUnavailable,
    Stored,
    Transient,
    decide,
)
from consumer.settle import Settler
from shared.events import ResultEvent
from shared.schema import H_REASON
from shared.settings import ConsumerSettings
from shared.topology import EXCHANGE_DLQ, EXCHANGE_RESULTS, QUEUE_REALTIME
from tests.support.fakes import FakeChannel, FakePublisher, FakeStore, task_envelope

OK = Ok((), 640, 480)


def settler(store: FakeStore, **changes: object) -> Settler:
    settings = ConsumerSettings(consumer_id="unit", max_retries=2, **changes)  # type: ignore[arg-type]
    return Settler(settings, fake_model_info(), store, ConsumerMetrics())


def job_with(channel: FakeChannel, outcome: Outcome | None, lane: str = "bulk", **changes: object) -> Job:
    envelope = dataclasses.replace(task_envelope(lane), **changes)  # type: ignore[arg-type]
    job = channel.deliver(envelope, QUEUE_REALTIME if lane == "realtime" else "detfleet.bulk")
    job.outcome = outcome
    return job


async def test_an_ok_batch_writes_its_rows_and_acks_with_one_frame_without_reading_the_sink() -> None:
    store, channel, publisher = FakeStore(), FakeChannel(), FakePublisher()
    batch = [job_with(channel, OK) for _ in range(5)]

    result = await settler(store).settle(batch, publisher)

    assert not result.sink_down
    assert store.lookups == 0
    assert {store.rows[j.task_id].status for j in batch} == {"ok"}
    assert channel.sent == [("ack", 5, True)]
    assert publisher.to(EXCHANGE_DLQ) == []


async def test_acks_go_out_once_per_channel() -> None:
    store, first, second = FakeStore(), FakeChannel(), FakeChannel()
    batch = [job_with(first, OK), job_with(second, OK), job_with(first, OK)]

    await settler(store).settle(batch, FakePublisher())

    assert first.sent == [("ack", 2, True)]
    assert second.sent == [("ack", 1, False)]


async def test_a_failed_task_gets_a_row_one_confirmed_dlq_copy_under_its_id_and_an_ack() -> None:
    store, channel, publisher = FakeStore(), FakeChannel(), FakePublisher()
    bad, good = job_with(channel, BadInput("corrupt")), job_with(channel, OK)

    await settler(store).settle([bad, good], publisher)

    assert store.rows[bad.task_id].status == "failed"
    [copy] = publisher.to(EXCHANGE_DLQ)
    assert copy.message_id == str(bad.task_id)
    assert copy.headers[H_REASON] == "corrupt"
    assert store.dead_lettered == {bad.task_id}
    assert channel.acked() == {1, 2}


async def test_a_redelivery_of_a_task_whose_copy_was_confirmed_acks_without_a_second_copy() -> None:
    store, publisher = FakeStore(), FakePublisher()
    first = job_with(FakeChannel(), BadInput("corrupt"))
    await settler(store).settle([first], publisher)

    again_channel = FakeChannel()
    again = again_channel.deliver(dataclasses.replace(first.delivery.envelope, redelivered=True))
    again.outcome = BadInput("corrupt")
    await settler(store).settle([again], publisher)

    assert len(publisher.to(EXCHANGE_DLQ)) == 1
    assert again_channel.acked() == {1}
    assert store.rows[first.task_id].redeliveries == 1


async def test_a_failed_row_without_a_confirmed_copy_gets_it_from_any_later_delivery() -> None:
    store, publisher = FakeStore(), FakePublisher(refuse=[EXCHANGE_DLQ])
    first = job_with(FakeChannel(), BadInput("corrupt"), lane="realtime")
    await settler(store).settle([first], publisher)  # row written, copy refused, message requeued
    assert store.dead_lettered == set()

    channel = FakeChannel()
    late = channel.deliver(dataclasses.replace(first.delivery.envelope, redelivered=True), QUEUE_REALTIME)
    late.outcome = PastDeadline()  # alone, this would only shed
    working = FakePublisher()
    await settler(store).settle([late], working)

    [copy] = working.to(EXCHANGE_DLQ)
    assert copy.headers[H_REASON] == "corrupt"
    assert store.rows[first.task_id].status == "failed"
    assert store.dead_lettered == {first.task_id}


async def test_a_refused_copy_requeues_its_message_alone() -> None:
    store, channel = FakeStore(), FakeChannel()
    bad, good = job_with(channel, BadInput("corrupt")), job_with(channel, OK)

    await settler(store).settle([bad, good], FakePublisher(refuse=[EXCHANGE_DLQ]))

    assert channel.requeued() == {1}
    assert channel.acked() == {2}
    assert store.dead_lettered == set()


async def test_a_sink_outage_requeues_the_whole_batch_and_publishes_nothing() -> None:
    store, channel, publisher = FakeStore(), FakeChannel(), FakePublisher()
    batch = [job_with(channel, OK), job_with(channel, BadInput("corrupt"))]
    store.down = True

    result = await settler(store).settle(batch, publisher)

    assert result.sink_down
    assert channel.requeued() == {1, 2}
    assert channel.acked() == set()
    assert publisher.published == []


async def test_a_transient_failure_is_republished_to_a_retry_level_without_a_row() -> None:
    store, channel, publisher = FakeStore(), FakeChannel(), FakePublisher()
    job = job_with(channel, Transient("boom"))

    await settler(store).settle([job], publisher)

    [(exchange, copy)] = publisher.published
    assert exchange.startswith("detfleet.retry")
    assert copy.headers["x-detfleet-attempt"] == 2
    assert store.rows == {}
    assert channel.acked() == {1}


async def test_the_guard_fails_a_task_unrun_after_max_crashes_unfinished_starts() -> None:
    store, publisher = FakeStore(), FakePublisher()
    envelope = dataclasses.replace(task_envelope(), redelivered=True)
    part = settler(store, max_crashes=2)
    for _ in range(2):  # each start dies with the process: nothing settles it
        await part.guard(FakeChannel().deliver(envelope))

    channel = FakeChannel()
    third = channel.deliver(envelope)
    await part.guard(third)
    assert third.outcome == Crashed(2)
    await part.settle([third], publisher)

    row = store.rows[third.task_id]
    assert (row.status, row.reason) == ("failed", "crashed the consumer 2 times")
    assert len(publisher.to(EXCHANGE_DLQ)) == 1
    assert store.starts == {}  # settled: the mark is gone


async def test_the_guard_leaves_first_deliveries_alone_and_clears_a_finished_mark() -> None:
    store = FakeStore()
    part = settler(store)
    fresh = FakeChannel().deliver(task_envelope())
    await part.guard(fresh)
    assert store.starts == {}

    again = FakeChannel().deliver(dataclasses.replace(task_envelope(), redelivered=True))
    await part.guard(again)
    assert store.starts == {again.task_id: 1}
    again.outcome = OK
    await part.settle([again], FakePublisher())
    assert store.starts == {}


async def test_the_guard_requeues_when_the_sink_is_away() -> None:
    store = FakeStore()
    store.down = True
    channel = FakeChannel()
    job = channel.deliver(dataclasses.replace(task_envelope(), redelivered=True))
    await settler(store).guard(job)
    assert isinstance(job.outcome, SinkUnavailable)
    store.down = False
    result = await settler(store).settle([job], FakePublisher())
    assert result.sink_down
    assert channel.requeued() == {1}


# ---- the settle table, exhaustively -------------------------------------------------------------------

OUTCOMES: list[Outcome] = [
    OK,
    BadInput("bad"),
    Transient("flaky"),
    OutOfMemory("oom"),
    Crashed(2),
    SinkUnavailable("down"),
    PastDeadline(),
    DroppedByBroker("expired"),
]
STORED: list[Stored | None] = [
    None,
    Stored("ok", None, False),
    Stored("shed", "deadline exceeded", False),
    Stored("failed", "earlier", False),
    Stored("failed", "earlier", True),
]


@pytest.mark.parametrize(
    ("outcome", "lane", "attempt", "stored"),
    list(itertools.product(OUTCOMES, ["bulk", "realtime"], [1, 3], STORED)),
)
def test_every_combination_keeps_the_promises(
    outcome: Outcome, lane: str, attempt: int, stored: Stored | None
) -> None:
    task = FakeChannel().deliver(task_envelope(lane, attempt=attempt)).task
    action = decide(outcome, task, max_retries=2, stored=stored)

    if action.requeue:  # back to the broker untouched
        assert (action.status, action.dead_letter, action.retry) == (None, False, None)
        assert isinstance(outcome, SinkUnavailable)
    if action.dead_letter:  # a DLQ copy always has a failed row beside it, unless an ok row keeps the id
        assert action.status == "failed"
    if stored is not None and stored.dead_lettered:
        assert not action.dead_letter  # never a second copy
    owed = stored is not None and stored.status == "failed" and not stored.dead_lettered
    if owed and not action.requeue and action.status != "ok":
        assert action.dead_letter
        assert action.reason == "earlier"
    if action.status == "shed":
        assert lane == "realtime"
    if action.retry is not None:
        assert action.retry.attempt == attempt + 1
        assert attempt <= 2
        assert action.status is None
    assert action.requeue or action.status is not None or action.retry is not None


def test_a_message_with_no_usable_id_keeps_one_id_through_every_delivery() -> None:
    envelope = dataclasses.replace(task_envelope(), message_id=None)
    ids = {
        FakeChannel().deliver(dataclasses.replace(envelope, redelivered=again)).task_id
        for again in (False, True)
    }
    assert len(ids) == 1
    assert ids != {uuid.UUID(int=0)}


# ---- result events -------------------------------------------------------------------------------------


async def test_each_committed_row_is_announced_in_order_before_the_acks() -> None:
    store, channel, publisher = FakeStore(), FakeChannel(), FakePublisher()
    batch = [job_with(channel, OK), job_with(channel, BadInput("corrupt")), job_with(channel, OK)]

    await settler(store).settle(batch, publisher)

    events = [ResultEvent.from_json(e.body) for e in publisher.to(EXCHANGE_RESULTS)]
    assert [e.task_id for e in events] == [j.task_id for j in batch]
    assert [e.status for e in events] == ["ok", "failed", "ok"]
    assert events[1].reason == "corrupt"
    assert publisher.to(EXCHANGE_RESULTS)[1].routing_key.startswith("failed.")
    assert channel.acked() == {1, 2, 3}


async def test_a_retry_writes_no_row_and_so_announces_nothing() -> None:
    publisher = FakePublisher()
    await settler(FakeStore()).settle([job_with(FakeChannel(), Transient("boom"))], publisher)
    assert publisher.to(EXCHANGE_RESULTS) == []


async def test_a_refused_event_keeps_every_message_and_asks_for_a_pause() -> None:
    store, channel = FakeStore(), FakeChannel()
    batch = [job_with(channel, OK), job_with(channel, BadInput("corrupt"))]
    publisher = FakePublisher(refuse=[EXCHANGE_RESULTS])

    result = await settler(store).settle(batch, publisher)

    assert result.events_down
    assert channel.requeued() == {1, 2}
    assert channel.acked() == set()
    assert {store.rows[j.task_id].status for j in batch} == {"ok", "failed"}  # the rows stay committed
    assert publisher.to(EXCHANGE_DLQ) == []  # its redelivery publishes the copy with the event


async def test_without_a_publishing_connection_nothing_is_acked() -> None:
    channel = FakeChannel()

    async def unreachable() -> None:
        return None

    result = await settler(FakeStore()).settle([job_with(channel, OK)], unreachable)

    assert result.events_down
    assert channel.requeued() == {1}


async def test_a_redelivery_whose_row_exists_announces_the_stored_row_again() -> None:
    store, publisher = FakeStore(), FakePublisher()
    found = Ok((), 640, 480)
    first = job_with(FakeChannel(), found)
    await settler(store).settle([first], FakePublisher(refuse=[EXCHANGE_RESULTS]))  # committed, not announced

    channel = FakeChannel()
    again = channel.deliver(dataclasses.replace(first.delivery.envelope, redelivered=True))
    again.outcome = BadInput("decoded differently this time")
    await settler(store).settle([again], publisher)

    [event] = [ResultEvent.from_json(e.body) for e in publisher.to(EXCHANGE_RESULTS)]
    assert (event.task_id, event.status, event.reason) == (first.task_id, "ok", None)
    assert channel.acked() == {1}


async def test_events_can_be_turned_off() -> None:
    channel, publisher = FakeChannel(), FakePublisher()
    await settler(FakeStore(), result_events=False).settle([job_with(channel, OK)], publisher)
    assert publisher.published == []
    assert channel.acked() == {1}
