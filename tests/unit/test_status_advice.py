"""The scale-advice arithmetic of ``detfleet status``."""

from __future__ import annotations

import pytest

from detfleet.scale_advice import NO_ARRIVAL_RATE, NO_THROUGHPUT, advise, per_replica_rate, replicas_for


def test_per_replica_rate_is_the_mean_over_the_consumers_that_wrote_rows() -> None:
    assert per_replica_rate({"a": 600, "b": 300, "idle": 0}, 300) == 1.5


def test_no_rows_means_no_throughput() -> None:
    assert per_replica_rate({}, 300) is None
    assert per_replica_rate({"a": 0}, 300) is None


def test_replicas_round_up_but_not_on_float_noise() -> None:
    assert replicas_for(6.1, 1.5) == 5
    assert replicas_for(0.3 * 3, 0.3) == 3  # 0.9 / 0.3 is 3.0000000000000004 in floats
    assert replicas_for(0, 1.5) == 0


def test_keep_up_and_drain() -> None:
    advice = advise(per_replica=2.0, arrival_rate=5.0, backlog=600, drain_within_s=300)
    assert (advice.keep_up, advice.drain, advice.note) == (3, 4, None)  # 5/2 -> 3; (5 + 2)/2 -> 4


def test_missing_throughput_or_arrival_rate_gives_no_numbers_and_says_why() -> None:
    assert advise(None, 5.0, 10, 60).as_json()["note"] == NO_THROUGHPUT
    unknown = advise(1.0, None, 10, 60)
    assert (unknown.keep_up, unknown.drain, unknown.note) == (None, None, NO_ARRIVAL_RATE)


@pytest.mark.parametrize(("per_replica", "target"), [(0.0, 60.0), (1.0, 0.0)])
def test_nonsense_inputs_are_refused(per_replica: float, target: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        advise(per_replica, 1.0, 1, target)
