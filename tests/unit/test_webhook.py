"""The webhook forwarder's pure parts: its signature scheme, and events of one camera handled in order."""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict

from tenacity import AsyncRetrying, RetryCallState, wait_fixed

from detfleet.webhook import (
    H_SIGNATURE,
    H_TIMESTAMP,
    KeyedLanes,
    RetryableFailure,
    WaitRespectingRetryAfter,
    retry_after_s,
    signature,
    signed_headers,
    verify,
)
from shared.topology import USERS, parked_queue, webhook_queue

SECRET = b"whsec"
BODY = b'{"a":1}'


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    # printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec
    expected = "8ad37ba156048ae0e0a5533c75cdf26fee88b07f93cb57ee4c80adb053012032"
    assert signature(SECRET, "1700000000", BODY) == f"sha256={expected}"


def test_signed_headers_verify_and_any_change_breaks_them() -> None:
    headers = signed_headers(SECRET, BODY, "task", now=1_700_000_000)
    timestamp, signed = headers[H_TIMESTAMP], headers[H_SIGNATURE]
    assert timestamp == "1700000000"
    assert verify(SECRET, timestamp, BODY, signed, now=1_700_000_010)
    assert not verify(SECRET, timestamp, b'{"a":2}', signed, now=1_700_000_010)
    assert not verify(b"other", timestamp, BODY, signed, now=1_700_000_010)
    assert not verify(SECRET, "1700000001", BODY, signed, now=1_700_000_010)
    assert not verify(SECRET, "not a number", BODY, signed, now=1_700_000_010)


def test_an_old_timestamp_is_refused_even_with_a_good_signature() -> None:
    headers = signed_headers(SECRET, BODY, "task", now=1_700_000_000)
    assert verify(SECRET, headers[H_TIMESTAMP], BODY, headers[H_SIGNATURE], now=1_700_000_299)
    assert not verify(SECRET, headers[H_TIMESTAMP], BODY, headers[H_SIGNATURE], now=1_700_000_301)


async def test_items_of_one_key_run_one_at_a_time_in_order_and_keys_run_side_by_side() -> None:
    running: dict[str, int] = defaultdict(int)
    most_at_once: dict[str, int] = defaultdict(int)
    done: dict[str, list[int]] = defaultdict(list)
    both_running = asyncio.Event()
    total = 30
    finished = asyncio.Event()

    async def work(item: tuple[str, int]) -> None:
        key, n = item
        running[key] += 1
        most_at_once[key] = max(most_at_once[key], running[key])
        if len([k for k, v in running.items() if v]) == 2:
            both_running.set()
        await asyncio.sleep(0)  # yield, so another key's lane gets a turn meanwhile
        await asyncio.sleep(0)
        running[key] -= 1
        done[key].append(n)
        if sum(len(v) for v in done.values()) == total:
            finished.set()

    errors: list[BaseException] = []
    lanes: KeyedLanes[tuple[str, int]] = KeyedLanes(work, errors.append)
    for n in range(total // 2):
        lanes.submit("cam-a", ("cam-a", n))
        lanes.submit("cam-b", ("cam-b", n))
    await asyncio.wait_for(finished.wait(), 10)
    assert done == {"cam-a": list(range(15)), "cam-b": list(range(15))}
    assert most_at_once == {"cam-a": 1, "cam-b": 1}
    assert both_running.is_set()
    assert errors == []
    assert lanes.busy == 0


async def test_a_lane_that_fails_stops_there_and_the_others_go_on() -> None:
    done: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    finished = asyncio.Event()

    async def work(item: tuple[str, int]) -> None:
        if item == ("bad", 1):
            raise RuntimeError("broker lost")
        done.append(item)
        if item == ("good", 2):
            finished.set()

    lanes: KeyedLanes[tuple[str, int]] = KeyedLanes(work, errors.append)
    for n in range(3):
        lanes.submit("bad", ("bad", n))
        lanes.submit("good", ("good", n))
    await asyncio.wait_for(finished.wait(), 10)
    await lanes.stop(grace_s=5)
    assert [i for i in done if i[0] == "bad"] == [("bad", 0)]  # ("bad", 2) is left for the broker
    assert [i for i in done if i[0] == "good"] == [("good", 0), ("good", 1), ("good", 2)]
    assert [str(e) for e in errors] == ["broker lost"]


async def test_stop_lets_the_item_in_hand_finish_and_starts_no_other() -> None:
    started: list[int] = []
    release = asyncio.Event()

    async def work(n: int) -> None:
        started.append(n)
        await release.wait()

    lanes: KeyedLanes[int] = KeyedLanes(work, lambda error: None)
    for n in range(3):
        lanes.submit("cam", n)
    await asyncio.sleep(0)
    stopping = asyncio.create_task(lanes.stop(grace_s=5))
    await asyncio.sleep(0)
    release.set()
    await asyncio.wait_for(stopping, 5)
    assert started == [0]


def test_forwarder_names_and_the_subscriber_role() -> None:
    assert webhook_queue("mes") == "detfleet.results.webhook.mes"
    assert parked_queue(webhook_queue("mes")) == "detfleet.results.webhook.mes.parked"
    [subscriber] = [u for u in USERS if u.name == "detfleet-subscriber"]
    for name in ("amq.gen-abc", "detfleet.results.webhook.mes", "detfleet.results.webhook.mes.parked"):
        assert re.fullmatch(subscriber.configure, name)
        assert re.fullmatch(subscriber.write, name)
        assert re.fullmatch(subscriber.read, name)
    assert re.fullmatch(subscriber.read, "detfleet.results")  # to bind to it
    for refused in ("detfleet.results", "detfleet.frames", "detfleet.dlq", "detfleet.bulk"):
        assert not re.fullmatch(subscriber.write, refused)
        assert not re.fullmatch(subscriber.configure, refused)
    for refused in ("detfleet.frames", "detfleet.dlq", "detfleet.bulk", "detfleet.resultsx"):
        assert not re.fullmatch(subscriber.read, refused)


def test_retry_after_is_read_in_seconds_and_anything_else_is_ignored() -> None:
    assert retry_after_s("3") == 3.0
    assert retry_after_s("0.5") == 0.5
    assert retry_after_s(None) is None
    assert retry_after_s("Wed, 21 Oct 2026 07:28:00 GMT") is None  # the date form: our backoff applies
    assert retry_after_s("-1") is None
    assert retry_after_s("inf") is None


def test_the_wait_follows_retry_after_up_to_the_cap_else_the_backoff() -> None:
    wait = WaitRespectingRetryAfter(wait_fixed(0.25), cap_s=30)

    def after(error: BaseException) -> RetryCallState:
        state = RetryCallState(retry_object=AsyncRetrying(), fn=None, args=(), kwargs={})
        state.set_exception((type(error), error, None))
        return state

    assert wait(after(RetryableFailure("HTTP 503", retry_after=7))) == 7
    assert wait(after(RetryableFailure("HTTP 429", retry_after=3600))) == 30
    assert wait(after(RetryableFailure("HTTP 502"))) == 0.25
    assert wait(after(RetryableFailure("no answer in 10 s"))) == 0.25
