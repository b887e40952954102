"""Fakes behind the consumer's seams, so batching and settling run in unit tests without RabbitMQ or Postgres:
a channel that records acks and requeues, a publisher that records (or refuses) copies, and an in-memory
result store that keeps the sink's upsert rules."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np

from consumer.acker import Acker
from consumer.jobs import Job, admit
from consumer.outcomes import Stored
from consumer.sink import ResultRow, SinkUnavailableError, WriteReport, row_mapping
from shared.broker.aio import Delivery
from shared.errors import PublishNackedError
from shared.schema import Envelope, Task
from shared.topology import QUEUE_BULK, QUEUE_REALTIME


class FakeChannel:
    """One consumer channel: hands out delivery tags and records what was sent back for each."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bool]] = []
        self.ledger = Acker()
        self._next_tag = 1

    def deliver(self, envelope: Envelope, queue: str = QUEUE_BULK) -> Job:
        tag, self._next_tag = self._next_tag, self._next_tag + 1
        delivery = Delivery(envelope, queue, tag, _FakeMessage(tag, self.sent))  # type: ignore[arg-type]
        self.ledger.track(delivery)
        job = Job(delivery, self.ledger)
        admit(job)
        return job

    def acked(self) -> set[int]:
        """Every tag an ack covered (a multiple ack covers every lower tag not requeued)."""
        requeued = self.requeued()
        covered: set[int] = set()
        for kind, tag, multiple in self.sent:
            if kind == "ack":
                covered |= set(range(1, tag + 1)) - requeued if multiple else {tag}
        return covered

    def requeued(self) -> set[int]:
        return {tag for kind, tag, _ in self.sent if kind == "requeue"}


@dataclasses.dataclass
class _FakeMessage:
    tag: int
    sent: list[tuple[str, int, bool]]

    async def ack(self, multiple: bool = False) -> None:
        self.sent.append(("ack", self.tag, multiple))

    async def nack(self, requeue: bool = True) -> None:
        self.sent.append(("requeue", self.tag, False))


class FakePublisher:
    """Records every confirmed publish; refuses those whose exchange is in ``refuse``."""

    def __init__(self, refuse: Sequence[str] = ()) -> None:
        self.published: list[tuple[str, Envelope]] = []
        self.refuse = set(refuse)

    async def __call__(self) -> FakePublisher:
        """As the connection hands out its publishing channel to settling."""
        return self

    async def publish(
        self, envelope: Envelope, exchange: str, timeout: float | None = 10.0, mandatory: bool = True
    ) -> None:
        if exchange in self.refuse:
            raise PublishNackedError(f"publish to {exchange}: the broker refused it")
        self.published.append((exchange, envelope))

    def to(self, exchange: str) -> list[Envelope]:
        return [e for x, e in self.published if x == exchange]


class FakeStore:
    """The sink in memory, with its rules: ok is never overwritten, a conflict counts a redelivery."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, ResultRow] = {}
        self.dead_lettered: set[uuid.UUID] = set()
        self.starts: dict[uuid.UUID, int] = {}
        self.down = False
        self.lookups = 0

    async def stored(self, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Stored]:
        self._check()
        self.lookups += 1
        return {
            i: Stored(self.rows[i].status, self.rows[i].reason, i in self.dead_lettered)  # type: ignore[arg-type]
            for i in task_ids
            if i in self.rows
        }

    async def mark_started(self, task_id: uuid.UUID, consumer_id: str) -> int:
        self._check()
        self.starts[task_id] = self.starts.get(task_id, 0) + 1
        return self.starts[task_id] - 1

    async def write(self, rows: Sequence[ResultRow], finished: Sequence[uuid.UUID] = ()) -> WriteReport:
        self._check()
        absorbed = 0
        for row in rows:
            old = self.rows.get(row.task_id)
            if old is None or (old.status != "ok" and row.status == "ok"):
                self.rows[row.task_id] = row
            if old is not None:
                absorbed += 1
                self.rows[row.task_id] = dataclasses.replace(
                    self.rows[row.task_id], redeliveries=old.redeliveries + 1
                )
        for task_id in finished:
            self.starts.pop(task_id, None)
        committed: dict[uuid.UUID, Mapping[str, Any]] = {
            r.task_id: row_mapping(self.rows[r.task_id]) for r in rows
        }
        return WriteReport(len(rows) - absorbed, 0, absorbed, 0.0, committed)

    async def record_dead_lettered(self, task_ids: Sequence[uuid.UUID]) -> None:
        self._check()
        self.dead_lettered |= {i for i in task_ids if self.rows[i].status == "failed"}

    def _check(self) -> None:
        if self.down:
            raise SinkUnavailableError("Postgres is down (fake)")


def _tiny_jpeg() -> bytes:
    ok, data = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    assert ok
    return bytes(data)


TINY_JPEG = _tiny_jpeg()  # passes admission's header checks, so a job waits for inference


def task_envelope(lane: str = "bulk", body: bytes = TINY_JPEG, **changes: Any) -> Envelope:
    fields: dict[str, Any] = {
        "task_id": uuid.uuid4(),
        "lane": lane,
        "site": "site-a",
        "camera_id": "cam-1",
        "captured_at": datetime.now(UTC),
        "trace_id": "trace-1",
    }
    return Task(**{**fields, **changes}).to_envelope(body)


def lane_queue(lane: str) -> str:
    return QUEUE_REALTIME if lane == "realtime" else QUEUE_BULK
