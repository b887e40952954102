"""The gateway's confirm channel renews itself after a run of nacks (a RabbitMQ 3.10 channel can stay stuck
nacking a quorum queue that changed leader), and the nacks still reach the caller."""

from __future__ import annotations

from typing import Any

import pytest
from aiormq.exceptions import DeliveryError

from shared.broker import publishing
from shared.broker.publishing import ConfirmChannel
from shared.errors import PublishNackedError
from tests.support.fakes import task_envelope


class FakeExchange:
    def __init__(self, name: str, nacking: bool) -> None:
        self.name = name
        self.nacking = nacking
        self.published = 0

    async def publish(self, message: Any, routing_key: str, mandatory: bool) -> None:
        if self.nacking:
            raise DeliveryError(None, None)  # type: ignore[arg-type]  # no frame needed to nack
        self.published += 1


class FakeChannel:
    def __init__(self, nacking: bool) -> None:
        self.exchange = FakeExchange("detfleet.frames", nacking)
        self.closed = False

    async def get_exchange(self, name: str, ensure: bool) -> FakeExchange:
        return self.exchange

    async def close(self) -> None:
        self.closed = True


class FakeConnection:
    """Every channel opened on it confirms: the stuck one is only the first."""

    def __init__(self) -> None:
        self.opened: list[FakeChannel] = []

    async def channel(self, publisher_confirms: bool, on_return_raises: bool) -> FakeChannel:
        self.opened.append(FakeChannel(nacking=False))
        return self.opened[-1]


async def test_a_run_of_nacks_moves_publishing_to_a_fresh_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publishing, "RENEW_EVERY_S", 0.0)
    stuck, connection = FakeChannel(nacking=True), FakeConnection()
    confirm = ConfirmChannel(connection, stuck, stuck.exchange)  # type: ignore[arg-type]

    for _ in range(publishing.NACKS_BEFORE_RENEW):
        with pytest.raises(PublishNackedError):  # the caller still sees every nack: its backoff holds
            await confirm.publish(task_envelope())
    await confirm.publish(task_envelope())

    assert confirm.renewals == 1
    assert connection.opened[0].exchange.published == 1
    assert stuck.closed  # closed once nothing was in flight on it


async def test_fewer_nacks_keep_the_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publishing, "RENEW_EVERY_S", 0.0)
    stuck, connection = FakeChannel(nacking=True), FakeConnection()
    confirm = ConfirmChannel(connection, stuck, stuck.exchange)  # type: ignore[arg-type]

    for _ in range(publishing.NACKS_BEFORE_RENEW - 1):
        with pytest.raises(PublishNackedError):
            await confirm.publish(task_envelope())

    assert confirm.renewals == 0
    assert connection.opened == []
    assert not stuck.closed
