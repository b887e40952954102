"""The consumer's Prometheus metrics (prefix ``detfleet_``), on a registry of its own so tests can run
several workers in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ConsumerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter("detfleet_received", "Messages received", ["queue"], registry=r)
        self.outcomes = Counter("detfleet_outcomes", "Messages settled, by outcome", ["kind"], registry=r)
        self.redeliveries = Counter(
            "detfleet_redeliveries_absorbed", "Deliveries of a task id that already had its row", registry=r
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

    @staticmethod
    def _latency(name: str, doc: str, registry: CollectorRegistry) -> Histogram:
        return Histogram(f"detfleet_{name}_seconds", doc, buckets=_LATENCY_BUCKETS, registry=registry)
