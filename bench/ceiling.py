"""The ceilings the fleet is measured against.

- ``pipeline``: decode, preprocess, infer and a batched Postgres insert in one process, no broker: detfleet's
  own decode function, detector and sink, pipelined as the worker pipelines them (decode of batch N+1 in a
  thread pool while batch N infers in its own thread, two batches in flight), fed from memory;
- ``broker``: publish and consume the same bodies with aio-pika and no work: persistent messages with
  publisher confirms (256 in flight) into a durable queue, consumed at the same time (prefetch 256), one ack
  each;
- ``raw_onnx``: ONNX Runtime alone on a ready input tensor at several batch sizes, nothing else running.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import numpy as np
import onnxruntime as ort

from bench.common import BenchEnv, ResourceSampler, held_ms, latency_summary, rate_from_rows
from bench.publishing import PLAIN_QUEUE, publish
from consumer.decode import decode_frame
from consumer.detector import DetectorConfig, load_detector
from consumer.detector.base import Detection, Detector
from consumer.sink import ResultRow, Sink

BATCHES_IN_FLIGHT = 2
DECODE_THREADS = 2


def _row(index: int, started: datetime, done: datetime, detections: Sequence[Detection]) -> ResultRow:
    return ResultRow(
        task_id=uuid.uuid4(),
        camera_id="cam-1",
        site="bench",
        lane="bulk",
        captured_at=started,
        received_at=started,
        completed_at=done,
        status="ok",
        reason=None,
        attempt=1,
        consumer_id="ceiling",
        model_name=None,
        model_sha256=None,
        provider=None,
        queue_wait_ms=None,
        decode_ms=None,
        inference_ms=None,
        sink_ms=None,
        end_to_end_ms=None,
        image_width=640,
        image_height=480,
        detections=[d.to_json() for d in detections],
        trace_id=str(index),
    )


async def _pipeline(
    env: BenchEnv, detector: Detector, bodies: Sequence[bytes], count: int, batch: int
) -> None:
    loop = asyncio.get_running_loop()
    input_size = detector.info.input_size
    decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
    infer_pool = ThreadPoolExecutor(1, thread_name_prefix="infer")
    slots = asyncio.Semaphore(BATCHES_IN_FLIGHT)
    sink = await Sink.open(env.database_url)

    async def one(start: int) -> None:
        try:
            started = datetime.now(UTC)
            chunk = [bodies[i % len(bodies)] for i in range(start, min(start + batch, count))]
            decoded = await asyncio.gather(
                *(loop.run_in_executor(decode_pool, decode_frame, b, input_size) for b in chunk)
            )
            frames = [frame for frame in decoded if not isinstance(frame, str)]  # the bench's all decode
            results = await loop.run_in_executor(infer_pool, detector.detect, frames)
            done = datetime.now(UTC)
            await sink.write([_row(start + i, started, done, r) for i, r in enumerate(results)])
        finally:
            slots.release()

    try:
        tasks = []
        for start in range(0, count, batch):
            await slots.acquire()
            tasks.append(asyncio.create_task(one(start)))
        await asyncio.gather(*tasks)
    finally:
        await sink.close()
        decode_pool.shutdown()
        infer_pool.shutdown()


async def pipeline_ceiling(
    env: BenchEnv, model: Path, bodies: Sequence[bytes], count: int, batch: int, threads: int = 0
) -> dict[str, Any]:
    """One in-process run at ``batch``: tasks/s from the rows, as for every peer."""
    detector = load_detector(DetectorConfig(model_path=model, device="cpu", intra_op_threads=threads))
    await env.reset_rows()
    with ResourceSampler(lambda: [os.getpid()]) as sampler:
        await _pipeline(env, detector, bodies, count, batch)
    rows = await env.rows()
    return {
        "max_batch": batch,
        "intra_op_threads": threads,
        "tasks_per_s": rate_from_rows(rows),
        "latency_ms": latency_summary(held_ms(rows)),
        "latency_kind": "batch start to row (no broker: no queueing)",
        **sampler.figures(),
    }


async def broker_ceiling(env: BenchEnv, bodies: Sequence[bytes], count: int) -> dict[str, Any]:
    """Publish ``count`` bodies and consume them at the same time, no work; rate and publish-to-receive."""
    connection = await aio_pika.connect(env.amqp_url)
    latencies: list[float] = []
    done = asyncio.Event()
    first: list[float] = []
    last: list[float] = []
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=256)
        queue = await channel.declare_queue(PLAIN_QUEUE, durable=True)
        await queue.purge()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            now = datetime.now(UTC)
            captured = datetime.fromisoformat(str((message.headers or {})["captured_at"]))
            latencies.append((now - captured) / timedelta(milliseconds=1))
            await message.ack()
            if len(latencies) >= count:
                last.append(time.monotonic())
                done.set()

        await queue.consume(on_message)
        with ResourceSampler(lambda: [os.getpid()]) as sampler:
            first.append(time.monotonic())
            publish_rate = await publish(env.amqp_url, bodies, count, detfleet=False)
            await asyncio.wait_for(done.wait(), 300)
    finally:
        await connection.close()
    return {
        "tasks_per_s": round(count / (last[0] - first[0]), 1),
        "publish_per_s": round(publish_rate, 1),
        "latency_ms": latency_summary(latencies),
        "latency_kind": "publish to receipt, publishing at full speed",
        **sampler.figures(),
    }


def raw_onnx_grid(
    model: Path, batches: Sequence[int], threads: Sequence[int], seconds: float
) -> dict[str, Any]:
    """raw_onnx at each intra-op thread setting; the best rate of all is the raw throughput."""
    runs = {str(t): raw_onnx(model, batches, seconds, t) for t in threads}
    best = max(runs, key=lambda t: runs[t]["images_per_s"])
    return {
        "per_threads": runs,
        "per_batch": runs[best]["per_batch"],
        "best_threads": int(best),
        "best_batch": runs[best]["best_batch"],
        "images_per_s": runs[best]["images_per_s"],
    }


def raw_onnx(model: Path, batches: Sequence[int], seconds: float, threads: int = 0) -> dict[str, Any]:
    """Images per second of session.run on a ready random tensor (no decode, letterbox or postprocess)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    height, width = int(shape[2]), int(shape[3])
    name = session.get_inputs()[0].name
    rates = {}
    for batch in batches:
        blob = np.random.default_rng(0).random((batch, 3, height, width), dtype=np.float32)
        session.run(None, {name: blob})  # allocations at this size
        images, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or images == 0:
            session.run(None, {name: blob})
            images += batch
        rates[str(batch)] = round(images / (time.perf_counter() - started), 2)
    best = max(rates, key=lambda k: rates[k])
    return {"per_batch": rates, "best_batch": int(best), "images_per_s": rates[best]}


# ---- the machine's limit: every core decoding and inferring, nothing else ------------------------------


def _limit_worker(
    model: str, bodies: Sequence[bytes], batch: int, seconds: float, ready: Any, go: Any, out: Any
) -> None:
    """One process: its own detector (one intra-op thread), decode + infer batches of ``bodies`` from
    memory for ``seconds`` once every process is ready; puts (images, seconds) on ``out``."""
    detector = load_detector(DetectorConfig(model_path=Path(model), device="cpu", intra_op_threads=1))
    size = detector.info.input_size
    detector.detect([f for f in (decode_frame(b, size) for b in bodies[:batch]) if not isinstance(f, str)])
    ready.release()
    go.wait()
    images, index, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds or images == 0:
        chunk = [bodies[(index + i) % len(bodies)] for i in range(batch)]
        index += batch
        frames = [f for f in (decode_frame(b, size) for b in chunk) if not isinstance(f, str)]
        detector.detect(frames)
        images += len(frames)
    out.put((images, time.perf_counter() - started))


def machine_limit(
    model: Path, bodies: Sequence[bytes], batch: int, seconds: float, processes: int = 0
) -> dict[str, Any]:
    """What the CPU can do at all: one process a core (``processes``, 0 = the cores), each decoding and
    inferring batches from memory with one ONNX Runtime thread; no broker, no database, no threads shared.
    Images per second summed over the processes, all started together."""
    import multiprocessing

    count = processes or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    ready, go, out = context.Semaphore(0), context.Event(), context.Queue()
    args = (str(model), list(bodies), batch, seconds, ready, go, out)
    workers = [context.Process(target=_limit_worker, args=args, daemon=True) for _ in range(count)]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.acquire(timeout=300)
    go.set()
    results = [out.get(timeout=seconds + 300) for _ in workers]
    for worker in workers:
        worker.join(60)
    rate = sum(images / elapsed for images, elapsed in results)
    return {
        "processes": count,
        "max_batch": batch,
        "intra_op_threads": 1,
        "tasks_per_s": round(rate, 2),
        "per_process_per_s": [round(i / e, 2) for i, e in results],
        "latency_kind": "none (no queueing: decode and inference only)",
    }
