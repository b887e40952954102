"""The HTTP gateway's long-lived parts: the confirm-channel publisher, the broker connection the result
streams subscribe on, the database pool, auth, rate limits, the page's caches and the metrics.

The gateway starts while the broker or the database is away: it connects in the background, ``/readyz``
says what is missing meanwhile, and ``POST /v1/frames`` answers 503 instead of holding the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry

from producer.http.auth import Authenticator, RateLimiter
from producer.http.live import FleetFigures, LatestFrames
from producer.http.metrics import GatewayMetrics
from producer.http.store import Store
from producer.metrics import ProducerMetrics
from producer.publisher import AsyncPublisher
from shared.broker.aio import Broker
from shared.errors import BrokerError
from shared.settings import GatewaySettings, mask_url

logger = logging.getLogger(__name__)

CONNECT_FIRST_S = 0.2
CONNECT_MAX_S = 5.0


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.name = f"detfleet-gateway:{settings.producer_name}"
        self.registry = CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self.auth = Authenticator.from_settings(settings)
        self.limiter = RateLimiter(settings.gateway_rate, settings.gateway_burst)
        self.publisher = AsyncPublisher(
            settings, metrics=ProducerMetrics(self.registry), connection_name=self.name
        )
        self.store = Store(settings.database_url, settings.producer_name)
        self.frames = LatestFrames(settings.gateway_frame_cameras)
        self.fleet = FleetFigures(settings)
        self.broker: Broker | None = None
        self._publishing = False
        self._connector: asyncio.Task[None] | None = None

    @property
    def can_publish(self) -> bool:
        """The publisher is connected and the broker is taking frames (not blocked, not away)."""
        return self._publishing and not self.publisher.held_up

    async def start(self) -> None:
        await self.store.start()
        self._connector = asyncio.get_running_loop().create_task(self._connect(), name="gateway-connect")

    async def close(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        if self._publishing:
            await self.publisher.close()
        if self.broker is not None:
            await self.broker.close()
        await self.store.close()

    async def _connect(self) -> None:
        """The publisher first (frames matter most), then the subscribing connection; both retry until the
        broker answers. Once connected, each reconnects by itself."""
        await self._retry("publisher", self.publisher.start)
        self._publishing = True
        await self._retry("result streams", self._connect_broker)

    async def _connect_broker(self) -> None:
        self.broker = await Broker.connect(self.settings.amqp_url, f"{self.name}:streams")

    async def _retry(self, what: str, connect: Callable[[], Awaitable[None]]) -> None:
        delay = CONNECT_FIRST_S
        while True:
            try:
                await connect()
            except BrokerError as error:
                logger.warning(
                    "Gateway %s: %s not connected to %s (%s); next try in %.1f s",
                    self.name,
                    what,
                    mask_url(self.settings.amqp_url),
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, CONNECT_MAX_S)
                continue
            logger.info("Gateway %s: %s connected", self.name, what)
            return
