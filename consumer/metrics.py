"""The consumer's Prometheus metrics (prefix ``detfleet_``), on a registry of its own so tests can run
several workers in one process.

Per-camera series are bounded: the first ``max_cameras`` distinct cameras a replica sees keep a label of
their own, later ones share ``camera="other"`` (a plant of thousands of cameras must not explode the
series count), and frames whose camera could not be read count as ``camera="unknown"``.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

OTHER_CAMERAS = "other"
UNKNOWN_CAMERA = "unknown"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ConsumerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_cameras: int = 200) -> None:
        self.registry = registry or CollectorRegistry()
        self._max_cameras = max_cameras
        self._cameras: set[str] = set()
        r = self.registry
        self.received = Counter("detfleet_received", "Messages received", ["queue"], registry=r)
        self.outcomes = Counter("detfleet_outcomes", "Messages settled, by outcome", ["kind"], registry=r)
        self.redeliveries = Counter(
            "detfleet_redeliveries_absorbed", "Deliveries of a task id that already had its row", registry=r
        )
        self.result_events = Counter(
            "detfleet_result_events",
            "Result events published to detfleet.results, by whether the broker confirmed them",
            ["result"],
            registry=r,
        )
        self.batch_size = Histogram(
            "detfleet_batch_size", "Images per inference batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_wait = self._latency("queue_wait", "From publish to batch start", r)
        self.decode = self._latency("decode", "Decoding one batch", r)
        self.inference = self._latency("inference", "Inference of one batch", r)
        self.sink = self._latency("sink", "Writing one batch's rows", r)
        self.end_to_end = self._latency("end_to_end", "From capture to the committed row", r)
        self.in_flight = Gauge("detfleet_in_flight", "Messages held unacked", registry=r)
        self.ready = Gauge("detfleet_ready", "1 when the worker takes work", registry=r)
        self.batch_limit = Gauge(
            "detfleet_batch_limit", "Largest batch formed now (halved after out-of-memory)", registry=r
        )
        self.model = Info("detfleet_model", "The loaded model", registry=r)
        self.camera_received = Counter(
            "detfleet_camera_frames_received", "Frames received, per camera", ["camera"], registry=r
        )
        self.camera_settled = Counter(
            "detfleet_camera_frames_settled",
            "Frames settled with a row, per lane, camera and status",
            ["lane", "camera", "status"],
            registry=r,
        )
        self.camera_last_frame = Gauge(
            "detfleet_camera_last_frame_timestamp_seconds",
            "When this replica last received a frame of the camera (Unix time)",
            ["camera"],
            registry=r,
        )

    def camera(self, camera_id: str | None) -> str:
        """The bounded label value of a camera."""
        if camera_id is None:
            return UNKNOWN_CAMERA
        if camera_id in self._cameras:
            return camera_id
        if len(self._cameras) < self._max_cameras:
            self._cameras.add(camera_id)
            return camera_id
        return OTHER_CAMERAS

    def frame_received(self, camera_id: str | None) -> None:
        label = self.camera(camera_id)
        self.camera_received.labels(label).inc()
        self.camera_last_frame.labels(label).set(time.time())

    def frame_settled(self, lane: str | None, camera_id: str | None, status: str) -> None:
        self.camera_settled.labels(lane or "unknown", self.camera(camera_id), status).inc()

    @staticmethod
    def _latency(name: str, doc: str, registry: CollectorRegistry) -> Histogram:
        return Histogram(f"detfleet_{name}_seconds", doc, buckets=_LATENCY_BUCKETS, registry=registry)
