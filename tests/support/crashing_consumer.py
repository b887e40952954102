"""A consumer replica whose detector kills its own process on a white frame, the way a segfault in a native
decoder or an OOM kill does: ``python -m tests.support.crashing_consumer``, configured by ``DETFLEET_``
variables like ``detfleet consume``. The crash-loop tests restart it and count the restarts."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from consumer.detector.base import DecodedFrame, Detection
from consumer.detector.fake import FakeDetector
from consumer.worker import Worker
from shared.logs import configure_logging
from shared.settings import ConsumerSettings, load_settings

CRASH_EXIT_CODE = 86


class CrashingDetector(FakeDetector):
    def detect(self, frames: Sequence[DecodedFrame]) -> list[list[Detection]]:
        if any(float(frame.pixels.mean()) > 250 for frame in frames):
            os._exit(CRASH_EXIT_CODE)  # no cleanup, no acks: the broker redelivers what was held
        return super().detect(frames)


def main() -> int:
    settings = load_settings(ConsumerSettings)
    configure_logging(settings.log_level, settings.log_json)
    return asyncio.run(Worker(settings, CrashingDetector()).run())


if __name__ == "__main__":
    raise SystemExit(main())
