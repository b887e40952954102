"""``detfleet consume``: one worker replica. Every option is also a ``DETFLEET_`` setting."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from consumer.detector import DetectorConfig, load_detector
from consumer.worker import Worker
from shared import db
from shared.broker.aio import Broker
from shared.errors import BrokerError, BrokerRefusedError, DatabaseError, DatabaseRefusedError
from shared.logs import configure_logging
from shared.settings import ConsumerSettings, load_settings

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detfleet consume", description="Run one worker replica.")
    parser.add_argument("--max-batch", type=int, help="largest inference batch (DETFLEET_MAX_BATCH)")
    parser.add_argument("--max-wait-ms", type=int, help="partial batch wait (DETFLEET_MAX_WAIT_MS)")
    parser.add_argument("--prefetch", type=int, help="bulk prefetch (DETFLEET_PREFETCH)")
    parser.add_argument("--model", dest="model_path", type=Path, help="ONNX model (DETFLEET_MODEL_PATH)")
    parser.add_argument("--health-port", type=int, help="probes and metrics port (DETFLEET_HEALTH_PORT)")
    parser.add_argument(
        "--exit-when-idle",
        dest="exit_when_idle_s",
        type=float,
        metavar="S",
        help="exit 0 once every queue is empty and nothing is held for S seconds",
    )
    return parser


def settings_from(argv: Sequence[str]) -> ConsumerSettings:
    given: dict[str, Any] = {k: v for k, v in vars(_parser().parse_args(argv)).items() if v is not None}
    return load_settings(ConsumerSettings, **given)


def detector_config(settings: ConsumerSettings) -> DetectorConfig:
    return DetectorConfig(
        model_path=settings.model_path,
        labels_path=settings.labels_path,
        confidence=settings.confidence,
        iou=settings.iou,
        max_detections=settings.max_detections,
        device=settings.device,
        intra_op_threads=settings.intra_op_threads,
    )


def install_signal_handlers(worker: Worker) -> None:
    """First SIGTERM/SIGINT drains gracefully; a second one exits at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if worker.exit_reason:
            logger.warning("Second signal: exiting now")
            os._exit(1)
        worker.request_stop(f"signal {signal.Signals(signum).name}")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def refuse_misconfiguration(settings: ConsumerSettings) -> None:
    """Stop at start-up, with one line, when the broker or Postgres answers but refuses these settings.

    A wrong password, vhost or database never heals, so a replica must not wait for it the way it waits
    out an outage; a service that does not answer yet is left to the worker, which retries until it does.
    """
    try:
        broker = await Broker.connect(settings.amqp_url, "detfleet-consumer:preflight", robust=False)
    except BrokerRefusedError:
        raise
    except BrokerError:
        pass  # not answering yet: the worker waits for it
    else:
        await broker.close()
    try:
        connection = await db.connect(settings.database_url)
    except DatabaseRefusedError:
        raise
    except DatabaseError:
        pass
    else:
        await connection.close()


async def _run(settings: ConsumerSettings) -> int:
    await refuse_misconfiguration(settings)
    detector = await asyncio.to_thread(load_detector, detector_config(settings))
    worker = Worker(settings, detector)
    install_signal_handlers(worker)
    code = await worker.run()
    logger.info("Exiting: %s", worker.exit_reason or "done")
    return code


def main(argv: Sequence[str]) -> int:
    settings = settings_from(argv)
    configure_logging(settings.log_level, settings.log_json)
    logger.info("Starting consumer", extra={"settings": settings.masked()})
    return asyncio.run(_run(settings))
