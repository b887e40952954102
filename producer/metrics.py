"""The producer's Prometheus metrics (prefix ``detfleet_``), plus plain counts for the CLI's summary.

Each publisher gets a registry of its own unless one is passed in, so tests and gateways embedding several
publishers never collide on prometheus-client's global registry.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge

from shared.settings import Lane

LANES: tuple[Lane, ...] = ("realtime", "bulk")

# Keys of :meth:`ProducerMetrics.counts`, in the order the CLI prints them.
COUNT_KEYS = ("published", "confirmed", "returned", "nacked", "refused", "buffered", "dropped", "resent")


class ProducerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._published = Counter(
            "detfleet_published", "Frames accepted for publishing", ["lane"], registry=r
        )
        self._confirmed = Counter("detfleet_confirmed", "Frames the broker confirmed", ["lane"], registry=r)
        self._returned = Counter("detfleet_returned", "Frames returned as unroutable", ["lane"], registry=r)
        self._nacked = Counter("detfleet_nacked", "Broker nacks (each retry counts)", ["lane"], registry=r)
        self._refused = Counter(
            "detfleet_refused", "Frames refused before publishing", ["reason"], registry=r
        )
        self._buffered = Counter(
            "detfleet_buffered",
            "Frames held because the broker was unreachable or blocked",
            ["lane"],
            registry=r,
        )
        self._dropped = Counter(
            "detfleet_dropped", "Frames given up on purpose", ["lane", "reason"], registry=r
        )
        self._resent = Counter(
            "detfleet_resent", "Unconfirmed frames resent after a lost connection", registry=r
        )
        self._blocked = Counter(
            "detfleet_blocked_seconds", "Time frames waited for an unreachable or blocked broker", registry=r
        )
        self._stream_gaps = Counter(
            "detfleet_stream_gaps", "Times a live stream was lost and came back", registry=r
        )
        self._stream_gap_seconds = Counter(
            "detfleet_stream_gap_seconds",
            "Time live streams were lost, from the loss to the next frame",
            registry=r,
        )
        self._held = Gauge("detfleet_buffer_frames", "Frames waiting in the buffer now", ["lane"], registry=r)
        self._tally: Tally[str] = Tally()
        self._children: dict[tuple[int, str], Counter] = {}
        self._blocked_s = 0.0

    def watch_buffers(self, held: Callable[[Lane], int]) -> None:
        """Read the buffer sizes when scraped: a gauge set on every frame would cost more than it tells."""
        for lane in LANES:
            self._held.labels(lane).set_function(partial(held, lane))

    def published(self, lane: str) -> None:
        self._count("published", self._child(self._published, lane))

    def confirmed(self, lane: str) -> None:
        self._count("confirmed", self._child(self._confirmed, lane))

    def returned(self, lane: str) -> None:
        self._count("returned", self._child(self._returned, lane))

    def nacked(self, lane: str) -> None:
        self._count("nacked", self._child(self._nacked, lane))

    def refused(self, reason: str) -> None:
        self._count("refused", self._refused.labels(reason))

    def buffered(self, lane: str) -> None:
        self._count("buffered", self._buffered.labels(lane))

    def dropped(self, lane: str, reason: str) -> None:
        self._count("dropped", self._dropped.labels(lane, reason))

    def resent(self) -> None:
        self._count("resent", self._resent)

    def blocked(self, seconds: float) -> None:
        self._blocked.inc(seconds)
        self._blocked_s += seconds

    def stream_gap(self, seconds: float) -> None:
        self._stream_gaps.inc()
        self._stream_gap_seconds.inc(seconds)

    @property
    def blocked_seconds(self) -> float:
        return self._blocked_s

    def counts(self) -> dict[str, int]:
        """Every count since start, zeros included: what the CLI's summary reports."""
        return {key: self._tally[key] for key in COUNT_KEYS}

    def _child(self, family: Counter, lane: str) -> Counter:
        # labels() takes a lock and builds a key on every call; a frame costs four of them at full rate.
        key = (id(family), lane)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(lane)
        return child

    def _count(self, key: str, counter: Counter) -> None:
        counter.inc()
        self._tally[key] += 1
