"""``detfleet status`` without services: where the advice's inputs come from, the tables, the options."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from rich.console import Console

from detfleet import status
from detfleet.scale_advice import advise
from detfleet.status import ConsumerSeen, QueueStatus, Report, advice_of, render
from shared.settings import AdminSettings
from shared.topology import QUEUE_BULK, QUEUE_DLQ, QUEUE_INTAKE, QUEUE_REALTIME, QUEUE_RETRY_READY


def queue(name: str, ready: int, unacked: int | None = 0, in_rate: float | None = 0.0) -> QueueStatus:
    return QueueStatus(name, ready, unacked, 1, in_rate, 0.0)


def test_arrivals_are_the_lanes_and_the_backlog_is_every_work_queue_but_not_the_dlq() -> None:
    queues = [
        queue(QUEUE_REALTIME, 10, 5, in_rate=4.0),
        queue(QUEUE_BULK, 100, 20, in_rate=2.0),
        queue(QUEUE_INTAKE, 3, in_rate=9.0),  # re-entries of lane tasks: not new arrivals
        queue(QUEUE_RETRY_READY, 2, in_rate=9.0),
        queue(QUEUE_DLQ, 1000, in_rate=9.0),
    ]
    seen = [ConsumerSeen("a", "x", 300), ConsumerSeen("a", "y", 300), ConsumerSeen("b", "x", 600)]

    advice = advice_of(queues, seen, window_s=300, drain_within_s=70)

    # 600 rows each over 300 s: 2/s a replica; 6/s arriving -> 3; 6 + 140/70 = 8/s -> 4.
    assert (advice.per_replica_rate, advice.arrival_rate, advice.backlog) == (2.0, 6.0, 140)
    assert (advice.keep_up, advice.drain) == (3, 4)


def test_an_unknown_lane_rate_leaves_the_arrival_rate_unknown() -> None:
    queues = [queue(QUEUE_REALTIME, 0, None, in_rate=None), queue(QUEUE_BULK, 5, None, in_rate=None)]
    advice = advice_of(queues, [ConsumerSeen("a", "x", 30)], window_s=300, drain_within_s=60)
    assert (advice.arrival_rate, advice.backlog, advice.keep_up) == (None, 5, None)


def test_management_figures_of_a_queue_that_never_saw_a_message() -> None:
    bare = {"name": QUEUE_BULK, "messages_ready": 0, "messages_unacknowledged": 0, "consumers": 3}
    assert status._from_management(QUEUE_BULK, bare) == QueueStatus(QUEUE_BULK, 0, 0, 3, 0.0, 0.0)
    assert status._from_management(QUEUE_BULK, None).ready is None


def report(**changes: Any) -> Report:
    values: dict[str, Any] = {
        "vhost": "/",
        "management_api": True,
        "queues": [queue(QUEUE_BULK, 7)],
        "rows_last_minute": {"ok": 1, "failed": 0, "shed": 0},
        "dlq_by_reason": {"not a JPEG": 2},
        "window_s": 300.0,
        "consumers_seen": [ConsumerSeen("a", "1" * 64, 5), ConsumerSeen("b", "2" * 64, 5)],
        "advice": advise(1.0, 2.0, 7, 60),
    }
    return Report(**(values | changes))


def shown(r: Report) -> str:
    console = Console(width=200, record=True)
    console.print(render(r))
    return console.export_text()


def test_the_tables_show_a_mixed_fleet_the_advice_and_what_is_missing() -> None:
    text = shown(report(missing=["management API http://x unreachable"]))
    assert "mixed fleet: 2 models running" in text
    assert "2 replicas keep up with 2.00 arriving/s, 3 drain the backlog of 7 within 1 min" in text
    assert "missing: management API http://x unreachable" in text
    assert "not a JPEG" in text


def test_a_quiet_fleet_says_so_instead_of_empty_tables() -> None:
    text = shown(report(dlq_by_reason={}, consumers_seen=[], advice=advise(None, 0.0, 0, 60)))
    assert "DLQ: no entries" in text
    assert "no rows from any consumer in the last 5 min" in text
    assert "no throughput measured yet" in text


def test_watch_refreshes_until_ctrl_c_then_exits_0(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    async def collect(settings: AdminSettings, window: timedelta, drain_within: timedelta) -> Report:
        calls.append(window)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return report()

    monkeypatch.setattr(status, "collect", collect)
    assert status.main(["--watch", "0.01", "--window", "2m"]) == 0
    assert calls == [timedelta(minutes=2)] * 3


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "--watch"],
        ["--drain-within", "0s"],
        ["--watch", "-1"],
        ["--watch", "inf"],
        ["--window", "soon"],
    ],
)
def test_bad_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        status.main(argv)
    assert stopped.value.code == 2
