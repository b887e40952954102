"""Which pika properties aiormq could not decode, and what a sanitised copy of them keeps."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pika
import pytest

from shared.broker.quarantine import QUARANTINE_HEADER, diagnose, is_undecodable, sanitised_properties

NOT_UTF8 = b"\xff\xfe"
TOO_LATE = 2**62  # pamqp reads it as milliseconds and still lands in the year 146140482


class FarFutureTimestamp(datetime):
    """pika encodes a datetime through ``utctimetuple``; a day count far past 9999 gets an 8-byte timestamp
    no Python datetime can hold, as a foreign client may send."""

    def utctimetuple(self) -> Any:
        return (1970, 1, 10**12, 0, 0, 0, 0, 0, 0)


def far_future() -> FarFutureTimestamp:
    return FarFutureTimestamp(2000, 1, 1)


@pytest.mark.parametrize(
    "properties",
    [
        pika.BasicProperties(),
        pika.BasicProperties(
            content_type="image/jpeg",
            message_id="4f1d9c1e-2b7a-4a59-9d7e-0c0f0b6a1c11",
            app_id="gateway-7",
            timestamp=1_800_000_000,
            delivery_mode=2,
            headers={
                "x-detfleet-schema": 1,
                "site": "site-a",
                "captured_at": "2026-11-23T08:00:00.123Z",
                "when": datetime(2026, 1, 1, tzinfo=UTC),
                "nested": {"list": [1, "two", None, Decimal("1.5")]},
            },
        ),
        # Above 2**32 pamqp takes a timestamp for milliseconds, which stay in range up to year 9999.
        pika.BasicProperties(timestamp=2**40),
        # A long string header that is not UTF-8 decodes to bytes in pamqp, unlike a short string.
        pika.BasicProperties(headers={"raw": NOT_UTF8}),
        # Text that merely looks like latin-1 is still sent as UTF-8.
        pika.BasicProperties(app_id=NOT_UTF8.decode("latin-1")),
        pika.BasicProperties(headers={"latest": datetime(9999, 12, 31, tzinfo=UTC)}),
    ],
)
def test_properties_aiormq_decodes_are_not_flagged(properties: pika.BasicProperties) -> None:
    assert is_undecodable(properties) is None


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        (pika.BasicProperties(timestamp=TOO_LATE), "timestamp property is out of range"),
        (pika.BasicProperties(timestamp=2**64 - 1), "timestamp property is out of range"),
        (pika.BasicProperties(app_id=NOT_UTF8), "app_id property is not UTF-8 text"),
        (pika.BasicProperties(message_id=NOT_UTF8), "message_id property is not UTF-8 text"),
        (pika.BasicProperties(content_type=NOT_UTF8), "content_type property is not UTF-8 text"),
        (pika.BasicProperties(correlation_id=NOT_UTF8), "correlation_id property is not UTF-8 text"),
        (pika.BasicProperties(headers={NOT_UTF8: 1}), "header '\\xff\\xfe' is not UTF-8 text"),
        (pika.BasicProperties(headers={"captured": far_future()}), "header 'captured' is out of range"),
        (
            pika.BasicProperties(headers={"outer": {"inner": far_future()}}),
            "header 'outer' is out of range",
        ),
    ],
)
def test_each_bad_kind_is_named(properties: pika.BasicProperties, expected: str) -> None:
    reason = is_undecodable(properties)
    assert reason is not None
    assert reason.startswith(expected)


def test_out_of_range_reason_says_what_the_client_saw() -> None:
    assert is_undecodable(pika.BasicProperties(timestamp=TOO_LATE)) == (
        "timestamp property is out of range (year 146140482 is out of range)"
    )


def test_only_the_offenders_are_named_among_good_properties() -> None:
    properties = pika.BasicProperties(
        content_type="image/jpeg",
        app_id=NOT_UTF8,
        message_id="task-1",
        timestamp=TOO_LATE,
        headers={"site": "site-a", "bad": far_future(), "camera_id": "cam-1"},
    )
    diagnosis = diagnose(properties)
    assert diagnosis is not None
    assert diagnosis.bad_properties == {"app_id", "timestamp"}
    assert diagnosis.bad_headers == {"bad"}
    assert diagnosis.reason.count(";") == 2
    for name in ("timestamp property", "app_id property", "header 'bad'"):
        assert name in diagnosis.reason


def test_sanitised_copy_drops_offenders_and_keeps_the_rest() -> None:
    properties = pika.BasicProperties(
        content_type="image/jpeg",
        app_id=NOT_UTF8,
        message_id="task-1",
        timestamp=TOO_LATE,
        expiration="5000",
        delivery_mode=1,
        headers={"site": "site-a", "bad": far_future(), "x-death": [{"count": 1}]},
    )
    diagnosis = diagnose(properties)
    assert diagnosis is not None

    copy = sanitised_properties(properties, diagnosis)

    assert is_undecodable(copy) is None
    assert (copy.content_type, copy.message_id, copy.app_id, copy.timestamp) == (
        "image/jpeg",
        "task-1",
        None,
        None,
    )
    assert copy.delivery_mode == 2
    assert copy.expiration is None
    assert copy.headers == {"site": "site-a", QUARANTINE_HEADER: diagnosis.reason}
