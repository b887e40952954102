"""A realtime frame behind a deep bulk backlog waits for at most the one inference already running: it has a
batch slot of its own and infers before the bulk batch waiting (consumer/slots.py, docs/scaling.md)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from consumer.detector.base import DecodedFrame, Detection
from consumer.detector.fake import FakeDetector
from shared.broker.aio import Broker
from shared.settings import AdminSettings
from tests.integration.consumer_support import (
    consumer_settings,
    jpeg,
    make_task,
    publish,
    rows_by_id,
    running,
)
from tests.integration.test_consumer_faults import eventually

REALTIME_SIZE = (200, 100)  # the detector tells realtime frames from bulk ones (160x120) by their size
HANG_BOUND_S = 60.0


class HeldDetector(FakeDetector):
    """Holds its first call until released, and records each call's lane in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def detect(self, frames: Sequence[DecodedFrame]) -> list[list[Detection]]:
        self.calls.append("realtime" if frames[0].source_size == REALTIME_SIZE else "bulk")
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(HANG_BOUND_S), "the test never released the detector"
        return super().detect(frames)


async def test_a_realtime_frame_infers_next_while_both_batch_slots_hold_bulk_work(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    detector = HeldDetector()
    settings = consumer_settings(
        topology_settings, results_db, max_batch=4, batches_in_flight=2, exit_when_idle_s=None
    )
    bulk = [make_task() for _ in range(12)]
    realtime = make_task(lane="realtime", camera="cam-rt")
    async with running(settings, detector) as worker:
        for task in bulk:
            await publish(broker, task, jpeg(1))

        async def one_inferring_one_waiting() -> bool:
            return detector.entered.is_set() and worker.pipeline.waiting_for_inference() == 1

        await eventually(one_inferring_one_waiting, "a bulk batch inferring and another waiting its turn")
        await publish(broker, realtime, jpeg(2, *REALTIME_SIZE))

        async def realtime_waiting_too() -> bool:
            return worker.pipeline.waiting_for_inference() == 2

        await eventually(realtime_waiting_too, "the realtime batch decoded beside both bulk batches")
        detector.release.set()

        async def all_rows() -> bool:
            return len(await rows_by_id(results_db)) == len(bulk) + 1

        await eventually(all_rows, "every frame has its row")
    assert detector.calls[:3] == ["bulk", "realtime", "bulk"]
