"""The HTTP gateway's Prometheus metrics, on the registry its publisher's metrics share (one /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Publish-to-confirm latency: a few milliseconds on loopback, seconds while the broker pushes back.
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "detfleet_gateway_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=registry,
        )
        self.accepted = Counter(
            "detfleet_gateway_frames_accepted",
            "Frames answered 202 (the broker confirmed them)",
            ["lane"],
            registry=registry,
        )
        self.refused = Counter(
            "detfleet_gateway_frames_refused",
            "Frames answered 4xx or 503, by status code",
            ["status"],
            registry=registry,
        )
        self.publish_seconds = Histogram(
            "detfleet_gateway_publish_seconds",
            "From handing a frame to the publisher to the broker's confirm",
            buckets=PUBLISH_BUCKETS,
            registry=registry,
        )
        self.streams = Gauge(
            "detfleet_gateway_result_streams", "Result streams open now", ["kind"], registry=registry
        )
        self.stream_drops = Counter(
            "detfleet_gateway_stream_events_dropped",
            "Events dropped because a stream's client read slower than they arrived",
            registry=registry,
        )
        self.unremembered = Counter(
            "detfleet_gateway_accepted_not_recorded",
            "Confirmed frames whose acceptance the database did not record (GET says unknown until the row)",
            registry=registry,
        )
