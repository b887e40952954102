"""bench/scale.py's pure figures and the report's scale section, without a broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import report, run, scale
from shared.topology import QUEUE_BULK


def _times(count: int, step_s: float, start_gap_s: float = 0.0) -> list[datetime]:
    zero = datetime(2026, 1, 1, tzinfo=UTC)
    return [zero + timedelta(seconds=start_gap_s * (i == 0) + i * step_s) for i in range(count)]


def test_the_steady_rate_leaves_out_start_up_and_the_tail() -> None:
    times = _times(100, 0.01)
    times[0] -= timedelta(seconds=30)  # a replica that started late does not drag the rate down
    times[-1] += timedelta(seconds=30)  # nor does a straggler at the end
    assert scale.steady_rate(times) == 100.0
    assert scale.steady_rate(times[:5]) is None


def test_within_a_tolerance_of_the_reference() -> None:
    assert scale.within(90.0, 100.0, 0.10) is True
    assert scale.within(89.0, 100.0, 0.10) is False
    assert scale.within(None, 100.0, 0.10) is None


def test_the_default_storage_is_the_shipped_bulk_policy_with_the_default_mode() -> None:
    shipped, default = scale.storage_policy("shipped"), scale.storage_policy("default")
    assert shipped.queue == default.queue == QUEUE_BULK
    assert shipped.definition["queue-mode"] == "lazy"
    assert default.definition["queue-mode"] == "default"
    without = {k: v for k, v in shipped.definition.items() if k != "queue-mode"}
    assert without == {k: v for k, v in default.definition.items() if k != "queue-mode"}


def _drain(backlog: int, rate: float) -> dict[str, Any]:
    broker = {"mode": "lazy", "queue_memory_mib": 1.0, "message_bytes_ram_mib": 0.0, "node_memory_mib": 200.0}
    return {"backlog": backlog, "publish_per_s": 1000.0, "tasks_per_s": rate, "broker": broker}


def _lanes(p99: float) -> dict[str, Any]:
    idle = {"latency_ms": {"p50": 30.0, "p99": 40.0}, "realtime_rate": 10.0, "bulk_backlog": 0}
    loaded = {"latency_ms": {"p50": 90.0, "p99": p99}, "bulk_backlog": 20_000, "bulk_per_s_meanwhile": 150.0}
    return {"16": {"max_batch": 16, "idle": idle, "backlog": loaded, "backlog_p99_over_idle_p99": p99 / 40}}


def test_the_report_has_every_scale_table(tmp_path: Path) -> None:
    replica = {"replicas": 8, "tasks_per_s": 190.0, "rss_mib_per_replica": 290.0, "prefetch": 48}
    figures: dict[str, Any] = {
        "frame_size": "320x240",
        "frame_bytes_mean": 17000,
        "backlog": {"shipped": {"runs": [_drain(1000, 200.0), _drain(200_000, 195.0)], "met": True}},
        "cameras": {"runs": [{"cameras": 1, "tasks_per_s": 200.0}, {"cameras": 1000, "tasks_per_s": 198.0}]},
        "replicas": {"1": {"runs": [{**replica, "prefetch_bodies_mib": 0.8}], "most_over_best": 1.0}},
        "lanes": _lanes(70.0),
        "lanes_baseline": _lanes(700.0),
    }
    figures["backlog"]["shipped"]["deepest_over_shallowest"] = 0.975
    figures["cameras"] |= {"many_over_one": 0.99, "met": True}
    figures["replicas"]["1"]["met"] = True
    for lanes in (figures["lanes"], figures["lanes_baseline"]):
        lanes["16"]["met"] = lanes["16"]["backlog"]["latency_ms"]["p99"] <= 80

    text = "\n".join(
        report.scale_lines(figures, tmp_path / "scale.png", tmp_path / "docs" / "performance.md")
    )

    assert "| shipped (lazy) | 200,000 |" in text
    assert "| 1 | 8 | 190.0 | - | - | 290.0 |" in text
    assert "deepest / shallowest drain rate = 0.975" in text
    assert "many / one = 0.990" in text
    assert "| 1 | 8 | 190.0 |" in text
    assert "| 16 | 2 | 30.0 | 40.0 | 90.0 | 70.0 | 1.75 | yes | 150.0 |" in text
    assert "| 16 | 2 | 30.0 | 40.0 | 90.0 | 700.0 | 17.50 | **no** | 150.0 |" in text
    report.scale_plot(figures, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_a_later_run_of_some_parts_replaces_only_those_and_says_so() -> None:
    earlier = {"started_at": "t1", "seconds": 900.0, "backlog": {"a": 1}, "lanes": {"old": 1}}
    later = {"started_at": "t2", "seconds": 300.0, "lanes": {"new": 1}, "lanes_baseline": {"before": 1}}

    merged = run.merge_parts(earlier, later, ["lanes"])

    assert merged["backlog"] == {"a": 1}
    assert merged["lanes"] == {"new": 1}
    assert merged["lanes_baseline"] == {"before": 1}
    assert [(r["parts"], r["started_at"]) for r in merged["runs"]] == [
        (["lanes", "backlog"], "t1"),
        (["lanes"], "t2"),
    ]
