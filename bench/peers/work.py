"""The per-message work of the peers: decode, detect one image, insert one row, with detfleet's own code.

Both peers write with asyncpg, the driver detfleet uses, so the comparison is not about drivers: each
worker process or thread keeps one connection and a private event loop and runs one INSERT per message.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import insert_row
from consumer.decode import decode_frame
from consumer.detector import DetectorConfig, load_detector


class Processor:
    """One detector (intra-op threads as given) and one database connection, used by one thread."""

    def __init__(self, model: Path, database_url: str, consumer_id: str, intra_op_threads: int = 1) -> None:
        config = DetectorConfig(model_path=model, device="cpu", intra_op_threads=intra_op_threads)
        self.detector = load_detector(config)
        self.consumer_id = consumer_id
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection = self._loop.run_until_complete(asyncpg.connect(database_url))

    def handle(self, body: bytes, task_id: str, captured_at: str, received_at: datetime) -> None:
        """Decode, detect, insert: raises on a frame that does not decode (the bench sends none)."""
        frame = decode_frame(body, self.detector.info.input_size)
        if isinstance(frame, str):
            raise ValueError(frame)
        started = time.perf_counter()
        detections = self.detector.detect([frame])[0]
        inference_ms = (time.perf_counter() - started) * 1000
        row: dict[str, Any] = {
            "task_id": uuid.UUID(task_id),
            "captured_at": datetime.fromisoformat(captured_at),
            "received_at": received_at,
            "consumer_id": self.consumer_id,
            "inference_ms": inference_ms,
            "width": frame.source_size[0],
            "height": frame.source_size[1],
            "detections": json.dumps([d.to_json() for d in detections]),
        }
        row["completed_at"] = datetime.now(UTC)
        self._loop.run_until_complete(insert_row(self._conn, row))

    def handle_batch(self, tasks: Sequence[tuple[bytes, str, str]], received_at: datetime) -> None:
        """(body, task id, captured at) of each task: decode all, one inference for the batch, one INSERT
        a row in one transaction (celery-batches' peer)."""
        frames = []
        for body, *_ in tasks:
            frame = decode_frame(body, self.detector.info.input_size)
            if isinstance(frame, str):
                raise ValueError(frame)
            frames.append(frame)
        started = time.perf_counter()
        results = self.detector.detect(frames)
        inference_ms = (time.perf_counter() - started) * 1000
        completed_at = datetime.now(UTC)
        rows = [
            {
                "task_id": uuid.UUID(task_id),
                "captured_at": datetime.fromisoformat(captured_at),
                "received_at": received_at,
                "completed_at": completed_at,
                "consumer_id": self.consumer_id,
                "inference_ms": inference_ms,
                "width": frame.source_size[0],
                "height": frame.source_size[1],
                "detections": json.dumps([d.to_json() for d in detections]),
            }
            for (_, task_id, captured_at), frame, detections in zip(tasks, frames, results, strict=True)
        ]
        self._loop.run_until_complete(self._insert_all(rows))

    async def _insert_all(self, rows: Sequence[dict[str, Any]]) -> None:
        async with self._conn.transaction():
            for row in rows:
                await insert_row(self._conn, row)

    def close(self) -> None:
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


class PerThread:
    """A Processor per thread, created on first use (a thread pool's threads each get their own)."""

    def __init__(self, model: Path, database_url: str, consumer_id: str) -> None:
        self._args = (model, database_url, consumer_id)
        self._local = threading.local()
        self._all: list[Processor] = []
        self._lock = threading.Lock()

    def get(self) -> Processor:
        processor: Processor | None = getattr(self._local, "processor", None)
        if processor is None:
            processor = Processor(*self._args)
            self._local.processor = processor
            with self._lock:
                self._all.append(processor)
        return processor

    def close(self) -> None:
        for processor in self._all:
            processor.close()
