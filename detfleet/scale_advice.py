"""Scale advice for ``detfleet status``: how many replicas keep up with arrivals, and drain a backlog in time.

Pure arithmetic, no I/O. The throughput of one replica is what the result rows show: rows written (ok,
failed and shed alike, each a settled task) per consumer over the window, averaged over the consumers seen.
While replicas are not busy that figure is bounded by the arrivals, so the advice then errs high; measured
under load (a backlog waiting) it is the replica's capacity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

NO_THROUGHPUT = "no throughput measured yet (no result rows in the window)"
NO_ARRIVAL_RATE = "arrival rate unknown (it comes from the management API)"


@dataclass(frozen=True)
class Advice:
    """Replicas needed; ``None`` with ``note`` saying why when a figure the arithmetic needs is missing."""

    per_replica_rate: float | None  # tasks per second one replica settled over the window
    arrival_rate: float | None  # tasks per second arriving in the lanes
    backlog: int
    drain_within_s: float
    keep_up: int | None
    drain: int | None
    note: str | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "per_replica_rate": self.per_replica_rate,
            "arrival_rate": self.arrival_rate,
            "backlog": self.backlog,
            "drain_within_s": self.drain_within_s,
            "replicas_to_keep_up": self.keep_up,
            "replicas_to_drain": self.drain,
            "note": self.note,
        }


def per_replica_rate(rows_per_consumer: Mapping[str, int], window_s: float) -> float | None:
    """Mean tasks per second per consumer seen; ``None`` when no consumer wrote a row in the window."""
    if window_s <= 0:
        raise ValueError(f"window must be positive, got {window_s}")
    busy = [count for count in rows_per_consumer.values() if count > 0]
    if not busy:
        return None
    return sum(busy) / len(busy) / window_s


def replicas_for(rate: float, per_replica: float) -> int:
    """The fewest replicas whose summed throughput reaches ``rate``."""
    if per_replica <= 0:
        raise ValueError(f"per-replica throughput must be positive, got {per_replica}")
    # Rounded first, so 6.000000001 (float noise of a division) asks for 6 replicas, not 7.
    return math.ceil(round(rate / per_replica, 9))


def advise(
    per_replica: float | None, arrival_rate: float | None, backlog: int, drain_within_s: float
) -> Advice:
    """Keep up: arrivals / per replica; drain: (arrivals + backlog / target) / per replica; rounded up."""
    if drain_within_s <= 0:
        raise ValueError(f"drain target must be positive, got {drain_within_s}")
    missing = NO_THROUGHPUT if per_replica is None else NO_ARRIVAL_RATE if arrival_rate is None else None
    if per_replica is None or arrival_rate is None:
        return Advice(per_replica, arrival_rate, backlog, drain_within_s, None, None, missing)
    keep_up = replicas_for(arrival_rate, per_replica)
    drain = replicas_for(arrival_rate + backlog / drain_within_s, per_replica)
    return Advice(per_replica, arrival_rate, backlog, drain_within_s, keep_up, drain)
