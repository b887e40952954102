"""A consumer replica that dies (``os._exit``, no cleanup) right after its first batch's rows commit and
before their result events go out: ``python -m tests.support.dying_consumer``, configured by ``DETFLEET_``
variables like ``detfleet consume``. The result-event tests check that the redelivery announces them."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Mapping
from typing import Any

from consumer.detector.fake import FakeDetector
from consumer.settle import Publisher, Settler
from consumer.worker import Worker
from shared.logs import configure_logging
from shared.settings import ConsumerSettings, load_settings
from tests.support.crashing_consumer import CRASH_EXIT_CODE

_announce = Settler._announce


def _die_before_announcing(
    self: Settler, committed: Mapping[uuid.UUID, Mapping[str, Any]], publisher: Publisher | None
) -> Awaitable[set[uuid.UUID]]:
    if committed:
        os._exit(CRASH_EXIT_CODE)  # the rows are committed; no event, no ack
    return _announce(self, committed, publisher)


def main() -> int:
    settings = load_settings(ConsumerSettings)
    configure_logging(settings.log_level, settings.log_json)
    Settler._announce = _die_before_announcing  # type: ignore[method-assign]
    return asyncio.run(Worker(settings, FakeDetector()).run())


if __name__ == "__main__":
    raise SystemExit(main())
