"""``/livez``, ``/readyz``, ``/metrics`` and ``PUT /loglevel?level=DEBUG`` on one small HTTP port.

``/livez`` fails when messages are held but no batch completed for ``stall_s`` (a hung inference, a stuck
loop): a restart helps then. ``/readyz`` fails while the model is not warmed, the channel is closed or
Postgres does not answer: the worker takes no work then, and a restart would not help.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.metrics import ConsumerMetrics


@dataclass
class HealthState:
    stall_s: float
    model_ready: bool = False
    channel_open: bool = False
    database_ok: bool = False
    last_progress: float = field(default_factory=time.monotonic)
    held: Callable[[], int] = lambda: 0

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def live(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self.last_progress
        if self.held() > 0 and stalled > self.stall_s:
            return False, f"{self.held()} messages held, no batch completed for {stalled:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        missing = [
            name
            for name, ok in (
                ("model", self.model_ready),
                ("channel", self.channel_open),
                ("database", self.database_ok),
            )
            if not ok
        ]
        return (not missing, "ok" if not missing else "not ready: " + ", ".join(missing))


def _probe(check: Callable[[], tuple[bool, str]]) -> Callable[[web.Request], object]:
    async def handler(_: web.Request) -> web.Response:
        ok, text = check()
        return web.Response(status=200 if ok else 503, text=text + "\n")

    return handler


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


async def set_log_level(request: web.Request) -> web.Response:
    """``PUT /loglevel?level=DEBUG``: change the log threshold of the running replica (until it restarts)."""
    level = request.query.get("level", "").upper()
    if level not in LEVELS:
        return web.Response(status=400, text=f"level must be one of {', '.join(LEVELS)}\n")
    logging.getLogger().setLevel(level)
    return web.Response(text=f"log level {level}\n")


async def start_health_server(state: HealthState, metrics: ConsumerMetrics, port: int) -> web.AppRunner:
    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/livez", _probe(state.live))  # type: ignore[arg-type]
    app.router.add_get("/readyz", _probe(state.ready))  # type: ignore[arg-type]
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_put("/loglevel", set_log_level)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()  # probes come from the kubelet
    return runner
