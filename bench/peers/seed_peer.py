"""The seed-style peer: the classic design, one inference per message.

A pika BlockingConnection consumer with ``basic_qos(prefetch_count=workers)`` hands each message to a
ThreadPoolExecutor of ``workers`` threads; each thread decodes, runs the model on that one image (its own
detector, one ONNX Runtime thread, so the pool is the parallelism), inserts one row and acks through
``add_callback_threadsafe`` (pika connections are not thread-safe). Runs until SIGTERM.

    python -m bench.peers.seed_peer --amqp-url ... --database-url ... --model m.onnx --workers 2
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from bench.peers.work import PerThread
from bench.publishing import PLAIN_QUEUE

logger = logging.getLogger("seed_peer")


def _work(
    processors: PerThread,
    connection: pika.BlockingConnection,
    channel: BlockingChannel,
    tag: int,
    body: bytes,
    properties: Any,
    received_at: datetime,
) -> None:
    try:
        processor = processors.get()
        processor.handle(body, properties.message_id, properties.headers["captured_at"], received_at)
        settle = functools.partial(channel.basic_ack, tag)
    except Exception:
        logger.exception("message failed; requeueing")
        settle = functools.partial(channel.basic_nack, tag, requeue=True)
    connection.add_callback_threadsafe(settle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    processors = PerThread(args.model, args.database_url, "seed")
    pool = ThreadPoolExecutor(args.workers, thread_name_prefix="seed")
    # Load the model in every thread before consuming, as a worker would at start-up.
    list(pool.map(lambda _: processors.get(), range(args.workers)))
    connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = connection.channel()
    channel.queue_declare(PLAIN_QUEUE, durable=True)
    channel.basic_qos(prefetch_count=args.workers)

    def on_message(ch: BlockingChannel, method: Any, properties: Any, body: bytes) -> None:
        received_at = datetime.now(UTC)
        pool.submit(_work, processors, connection, ch, method.delivery_tag, body, properties, received_at)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        connection.add_callback_threadsafe(channel.stop_consuming)

    signal.signal(signal.SIGTERM, on_term)
    channel.basic_consume(PLAIN_QUEUE, on_message)
    try:
        channel.start_consuming()
    finally:
        pool.shutdown(wait=True)
        connection.process_data_events(0)
        connection.close()
        processors.close()


if __name__ == "__main__":
    main()
