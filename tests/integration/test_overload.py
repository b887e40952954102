"""A short overload: producers at twice the measured capacity of one consumer, lanes shrunk to a few frames.

Bulk must push back (nacks, bounded retries, then a one-line error and a non-zero exit), realtime must
shed its oldest frames into ``shed`` rows, and every confirmed frame must end with exactly one row. The
long version is ``python -m tests.chaos.overload``; both print the report (consumer peak RSS included).
"""

from __future__ import annotations

import pytest

from tests.chaos.overload import OverloadConfig, print_report, run_overload

pytestmark = pytest.mark.integration

MEMORY_BOUND_MB = 2048  # generous: a consumer buffering the overload instead of pushing back would pass it


@pytest.mark.timeout(400)
async def test_overload_pushes_bulk_back_sheds_realtime_and_accounts_for_every_frame() -> None:
    report = await run_overload(OverloadConfig(duration_s=20.0))
    print_report(report)

    bulk, realtime = report.producers["bulk"], report.producers["realtime"]
    assert bulk.exit_code != 0
    assert "refused it 3 times (bulk queue full?); the fleet is pushing back" in bulk.last_error
    assert bulk.last_error.startswith("detfleet produce: error: ")
    assert bulk.summary["nacked"] > 0
    assert realtime.exit_code == 0, realtime.last_error
    assert report.rows["realtime"].get("shed", 0) > 0
    for lane in ("bulk", "realtime"):
        assert report.unaccounted(lane) == 0, lane
        assert report.strays(lane) == 0, lane
    assert report.consumer_exit == 0
    assert 0 < report.peak_rss_mb < MEMORY_BOUND_MB
