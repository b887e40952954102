"""The pure pieces of the benchmark harness: figures from rows, ratios, targets, the report, the model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bench import report, run
from bench.common import (
    batch_compute_ms,
    batch_sizes,
    end_to_end_ms,
    latency_summary,
    percentile,
    rate_from_rows,
    ratio,
)
from bench.publishing import schedule
from tests.support.onnx_graphs import conv_gflops, write_compute_bound_model, write_conv_head_model

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _row(received_s: float, completed_s: float, **extra: Any) -> dict[str, Any]:
    return {
        "received_at": T0 + timedelta(seconds=received_s),
        "completed_at": T0 + timedelta(seconds=completed_s),
        "consumer_id": "r1",
        **extra,
    }


def test_percentiles_interpolate_and_an_empty_sample_is_null() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([], 99) is None
    assert latency_summary([10.0] * 99 + [1000.0]) == {"p50": 10.0, "p99": 19.9, "n": 100}


def test_ratio_is_null_where_it_cannot_be_computed() -> None:
    assert ratio(270.0, 300.0) == 0.9
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 3.0) is None


def test_rate_counts_from_first_receipt_to_last_row() -> None:
    rows = [_row(1.0, 1.5), _row(1.2, 2.0), _row(2.5, 3.0)]
    assert rate_from_rows(rows) == 1.5  # 3 rows over 2 s; start-up before the first receipt is not counted
    assert rate_from_rows([]) is None


def test_end_to_end_runs_from_capture_and_skips_rows_without_one() -> None:
    rows = [_row(0.1, 0.25, captured_at=T0), _row(0.0, 1.0, captured_at=None)]
    assert end_to_end_ms(rows) == [250.0]


def test_batches_are_recovered_from_shared_completion_and_inference_time() -> None:
    first = {"inference_ms": 40.0, "decode_ms": 10.0}
    second = {"inference_ms": 30.0, "decode_ms": 5.0}
    rows = [_row(0, 1, **first), _row(0, 1, **first), _row(0, 2, **second), _row(0, 3, inference_ms=None)]
    assert sorted(batch_compute_ms(rows)) == [35.0, 50.0]
    assert batch_sizes(rows) == [1, 2]


def test_a_paced_schedule_spaces_publishes_and_a_backlog_sends_at_once() -> None:
    assert schedule(3, 4.0) == [0.0, 0.25, 0.5]
    assert schedule(2, None) == [0.0, 0.0]


def test_the_compute_bound_model_costs_about_8_gflops_and_the_conv_head_keeps_its_size(
    tmp_path: Path,
) -> None:
    assert 7.5 <= conv_gflops(write_compute_bound_model(tmp_path / "compute.onnx")) <= 8.5
    assert conv_gflops(write_conv_head_model(tmp_path / "head.onnx")) == pytest.approx(3.51, abs=0.01)


def _model_result(detfleet: float, ceiling: float, celery: float, p99_half: float) -> dict[str, Any]:
    best = {
        "replicas": 1,
        "max_batch": 8,
        "max_wait_ms": 20,
        "tasks_per_s": detfleet,
        "batch_compute_ms_p50": 40.0,
    }
    latency = {"p50": 30.0, "p99": p99_half, "n": 10}
    sweep = [{"load": load, "offered_per_s": 1.0, "achieved_per_s": 1.0, "latency_ms": latency,
              "batch_compute_ms_p50": 5.0} for load in run.SWEEP]  # fmt: skip
    ceiling_run = {"max_batch": 8, "tasks_per_s": ceiling}
    by_replicas = {"1": best}
    runs = {**best, "batch_size_mean": 8.0}
    figures = {"tasks_per_s": celery, "paced": {"achieved_per_s": 1.0, "latency_ms": latency}}
    return {
        "model": {"description": "test", "gflops": 1.0, "file": "m.onnx"},
        "raw_onnx": {"per_batch": {"8": 400.0}, "best_batch": 8, "images_per_s": 400.0},
        "ceiling": {"runs": [ceiling_run], "best": ceiling_run},
        "broker_ceiling": {"tasks_per_s": 1000.0},
        "celery": figures,
        "seed": dict(figures, tasks_per_s=celery * 2),
        "celery_batches": dict(figures, tasks_per_s=celery * 1.5),
        "machine_limit": {"processes": 2, "max_batch": 16, "tasks_per_s": 2 * ceiling},
        "detfleet": {"runs": [runs], "best": best, "best_by_replicas": by_replicas},
        "latency_rate_per_s": 1.0,
        "sweep": sweep,
    }  # fmt: skip


def test_ratios_are_keyed_by_what_they_divide() -> None:
    model = _model_result(detfleet=270.0, ceiling=300.0, celery=90.0, p99_half=100.0)
    ratios = run._ratios(model)
    assert ratios["detfleet_over_ceiling"] == 0.9
    assert ratios["detfleet_over_celery"] == 3.0
    assert ratios["detfleet_over_seed"] == 1.5
    assert ratios["detfleet_over_raw_onnx"] == 0.675
    assert ratios["detfleet_over_celery_batches"] == 2.0
    assert ratios["detfleet_over_machine_limit"] == 0.45


def test_targets_say_which_are_met_and_when_the_ceiling_rules_celery_out() -> None:
    model = _model_result(detfleet=270.0, ceiling=300.0, celery=150.0, p99_half=101.0)
    model["ratios"] = run._ratios(model)
    targets = run._targets("default", model, model["detfleet"]["best"])
    assert targets["detfleet_over_ceiling"]["met"]
    assert not targets["detfleet_over_celery"]["met"]
    assert "under 3x" in targets["detfleet_over_celery"]["note"]  # the ceiling is only 2x Celery
    assert targets["p99_at_half_load_ms"]["goal"] == 100.0  # 20 ms wait + 2 x 40 ms compute
    assert not targets["p99_at_half_load_ms"]["met"]


def test_the_report_has_a_row_per_peer_and_every_ratio(tmp_path: Path) -> None:
    model = _model_result(detfleet=270.0, ceiling=300.0, celery=90.0, p99_half=50.0)
    model["ratios"] = run._ratios(model)
    model["targets"] = run._targets("default", model, model["detfleet"]["best"])
    versions = {"python": "3.11", "onnxruntime": "1", "celery": "5", "rabbitmq": "3.10", "erlang": "25"}
    machine: dict[str, Any] = {"cpu": "cpu", "cores": 2, "memory_gib": 4, "os": "linux", "postgres": "15"}
    machine |= {**versions, "load_average_at_start": []}
    frames = {"distinct": 1, "size": "640x480", "format": "JPEG", "mean_bytes": 1, "per_saturated_run": {}}
    result = {
        "mode": "full",
        "started_at": "t",
        "machine": machine,
        "frames": frames,
        "models": {"default": model},
    }
    strongest: dict[str, Any] = {
        name: {"tasks_per_s": 100.0, "paced": {"latency_ms": {"p50": 1.0, "p99": 2.0}}}
        for name in ("machine_limit", "ceiling", "celery", "celery_batches", "seed", "detfleet")
    }
    strongest |= {"started_at": "t", "load_average_at_start": [], "load_average_at_end": [], "frames": 1}
    strongest |= {"latency_rate_per_s": 1.0, "ratios": {"detfleet_over_celery_batches": 1.0}}
    model["strongest"] = strongest
    text = report.markdown(result, tmp_path / "bench.png", tmp_path / "docs" / "performance.md")
    for label in report.LABELS.values():
        if label != report.LABELS["detfleet_2"]:  # this result measured one replica count only
            assert f"| {label} |" in text
    assert "`detfleet_over_celery`: 3.000" in text
    assert "](../bench.png)" in text
    assert "not quiet" not in text  # no load average was recorded above the core count
