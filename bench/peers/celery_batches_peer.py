"""The Celery + celery-batches peer: Celery's own answer to batching, configured as celery-batches' docs say.

- one ``Batches`` task (``celery_batches.Batches``): the worker's main process buffers requests and hands a
  list to the pool every ``flush_every`` requests or ``flush_interval`` seconds; ``flush_every`` is 16 and
  the interval 20 ms, detfleet's max batch and max wait, so both form the same batches;
- ``worker_prefetch_multiplier = 0`` (unlimited), the first of the two settings celery-batches' docs give
  ("zero, or some value where the final multiplied value is higher than flush_every"), so a buffer can fill;
- ``task_acks_late``: each request of a batch is acked in the pool's success callback once the whole batch
  returned; a failing batch is logged and acked all the same (celery-batches' own behaviour);
- otherwise as the Celery peer (bench/peers/celery_peer.py): prefork, concurrency = cores, JSON, no result
  backend, one ONNX Runtime thread per child; the batch is decoded, inferred as one batch and written in
  one statement a row (the peers' common work, bench/peers/work.py).

    BENCH_AMQP_URL=... BENCH_DATABASE_URL=... BENCH_MODEL=... \\
        celery -A bench.peers.celery_batches_peer worker --concurrency 2 -Q bench.detect.batches
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
from celery_batches import Batches  # type: ignore[import-untyped]

from bench.peers.work import Processor

QUEUE = "bench.detect.batches"
TASK = "bench.detect_batch"
FLUSH_EVERY = 16
FLUSH_INTERVAL_S = 0.02

app = Celery("bench-batches", broker=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=0,
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
        Path(os.environ["BENCH_MODEL"]), os.environ["BENCH_DATABASE_URL"], f"celery-batches-{os.getpid()}"
    )


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _unload(**_: Any) -> None:
    if _processor is not None:
        _processor.close()


@app.task(name=TASK, base=Batches, flush_every=FLUSH_EVERY, flush_interval=FLUSH_INTERVAL_S)  # type: ignore[untyped-decorator]
def detect_batch(requests: list[Any]) -> None:
    received_at = datetime.now(UTC)
    assert _processor is not None, "worker_process_init loads the model"
    _processor.handle_batch([(r.args[0], r.args[1], r.args[2]) for r in requests], received_at)
