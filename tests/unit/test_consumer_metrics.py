"""The consumer's metrics: per-camera series stay bounded, and the exposition passes promtool."""

from __future__ import annotations

import subprocess

from prometheus_client import generate_latest

from consumer.metrics import OTHER_CAMERAS, UNKNOWN_CAMERA, ConsumerMetrics


def test_cameras_past_the_cap_share_one_label_and_known_ones_keep_theirs() -> None:
    metrics = ConsumerMetrics(max_cameras=2)
    for camera in ["cam-1", "cam-2", "cam-3", "cam-4", "cam-1", None]:
        metrics.frame_received(camera)

    def received(camera: str) -> float | None:
        return metrics.registry.get_sample_value("detfleet_camera_frames_received_total", {"camera": camera})

    assert (received("cam-1"), received("cam-2"), received(OTHER_CAMERAS)) == (2.0, 1.0, 2.0)
    assert received("cam-3") is None
    assert received(UNKNOWN_CAMERA) == 1.0


def test_settled_frames_count_per_lane_camera_and_status() -> None:
    metrics = ConsumerMetrics()
    metrics.frame_settled("bulk", "cam-1", "ok")
    metrics.frame_settled("bulk", "cam-1", "ok")
    metrics.frame_settled(None, None, "failed")

    value = metrics.registry.get_sample_value
    labels = {"lane": "bulk", "camera": "cam-1", "status": "ok"}
    assert value("detfleet_camera_frames_settled_total", labels) == 2.0
    unknown = {"lane": "unknown", "camera": UNKNOWN_CAMERA, "status": "failed"}
    assert value("detfleet_camera_frames_settled_total", unknown) == 1.0


def test_the_exposition_passes_promtool_check_metrics() -> None:
    metrics = ConsumerMetrics()
    metrics.received.labels("detfleet.bulk").inc()
    metrics.frame_received("cam-1")
    metrics.frame_settled("bulk", "cam-1", "ok")
    metrics.end_to_end.observe(0.2)
    metrics.model.info({"name": "m.onnx", "sha256": "0" * 64, "provider": "CPUExecutionProvider"})

    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=generate_latest(metrics.registry),
        capture_output=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, (result.stdout + result.stderr).decode()
