"""What the live page shows beside the result events: the latest frame per camera, and the fleet's figures."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from shared.errors import DetfleetError
from shared.settings import GatewaySettings

logger = logging.getLogger(__name__)

FLEET_WINDOW = timedelta(minutes=5)
FLEET_DRAIN_WITHIN = timedelta(minutes=15)


@dataclass(frozen=True)
class HeldFrame:
    task_id: uuid.UUID
    body: bytes
    content_type: str


class LatestFrames:
    """The last frame that came through this gateway per camera, for at most ``cameras`` cameras (the
    least recently updated goes first): the page draws its boxes on it. Memory: cameras x one frame."""

    def __init__(self, cameras: int) -> None:
        self._cameras = cameras
        self._frames: OrderedDict[tuple[str, str], HeldFrame] = OrderedDict()

    def keep(self, site: str, camera: str, frame: HeldFrame) -> None:
        if self._cameras == 0:
            return
        key = (site, camera)
        self._frames.pop(key, None)
        self._frames[key] = frame
        while len(self._frames) > self._cameras:
            self._frames.popitem(last=False)

    def latest(self, site: str, camera: str) -> HeldFrame | None:
        return self._frames.get((site, camera))


class FleetFigures:
    """``detfleet status``'s collection as JSON, at most once per ``refresh_s`` however many pages ask."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._lock = asyncio.Lock()
        self._figures: dict[str, Any] | None = None
        self._at = 0.0

    async def current(self) -> dict[str, Any]:
        async with self._lock:
            if self._figures is None or time.monotonic() - self._at >= self._settings.gateway_fleet_refresh_s:
                self._figures = await self._collect()
                self._at = time.monotonic()
            return self._figures

    async def _collect(self) -> dict[str, Any]:
        # Imported here: the status module brings rich and the advice code, which only the page needs.
        from detfleet.status import collect

        try:
            report = await collect(self._settings, FLEET_WINDOW, FLEET_DRAIN_WITHIN)
        except DetfleetError as error:
            logger.info("Fleet figures unavailable: %s", error)
            return {"error": str(error)}
        figures = report.as_json()
        figures["dlq_entries"] = sum(report.dlq_by_reason.values())
        return figures
