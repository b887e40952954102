"""The Celery 5 peer: one task per frame, configured as Celery's docs recommend for long CPU-bound tasks.

- prefork pool, concurrency = cores (the worker's default, and the pool the docs name for CPU-bound work);
- ``task_acks_late`` with ``worker_prefetch_multiplier = 1``: each process reserves one task at a time and the
  message is acked after the task ran ("Optimizing: Reserve one task at a time");
- ``-O fair`` scheduling (the default since Celery 4), no result backend and ``task_ignore_result``;
- JSON, Celery's default serializer and the one its security guide recommends: the JPEG travels as bytes,
  which kombu encodes as base64 (about a third larger on the wire), as a Celery user sending a frame gets;
- the model is loaded once per child process (``worker_process_init``), one ONNX Runtime thread each,
  since the pool already runs one process per core.

    BENCH_AMQP_URL=... BENCH_DATABASE_URL=... BENCH_MODEL=... \\
        celery -A bench.peers.celery_peer worker --concurrency 2 -O fair -Q bench.detect
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from celery.signals import (  # type: ignore[import-untyped]
    worker_process_init,
    worker_process_shutdown,
)

from bench.peers.work import Processor

QUEUE = "bench.detect"
TASK = "bench.detect"

app = Celery("bench", broker=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    task_default_delivery_mode="persistent",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_processor: Processor | None = None


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _load(**_: Any) -> None:
    global _processor
    _processor = Processor(
        Path(os.environ["BENCH_MODEL"]), os.environ["BENCH_DATABASE_URL"], f"celery-{os.getpid()}"
    )


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _unload(**_: Any) -> None:
    if _processor is not None:
        _processor.close()


@app.task(name=TASK)  # type: ignore[untyped-decorator]
def detect(body: bytes, task_id: str, captured_at: str) -> None:
    received_at = datetime.now(UTC)
    assert _processor is not None, "worker_process_init loads the model"
    _processor.handle(body, task_id, captured_at, received_at)
