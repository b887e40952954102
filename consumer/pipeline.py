"""Decode and infer one batch, and give each job its outcome; no broker, no sink.

Decoding runs in a thread pool (cv2 releases the GIL) and inference in a thread of its own, so decoding
batch N+1 overlaps inferring batch N. A batch the runtime fails without naming a culprit is bisected until
the poison image stands alone; a batch that runs out of memory is split in halves at once (the images are
fine, the batch was too big) and the caller is told the size that failed, so it forms smaller batches.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from consumer.decode import decode_frame
from consumer.detector.base import DecodedFrame, Detection, Detector, InferenceError
from consumer.jobs import Job
from consumer.metrics import ConsumerMetrics
from consumer.outcomes import BadInput, Ok, OutOfMemory, Transient
from consumer.slots import Turns

# How ONNX Runtime's CPU arena and CUDA allocator word running out of memory.
_OUT_OF_MEMORY = re.compile(
    r"out of memory|failed to allocate memory|bad_alloc|CUDNN_STATUS_ALLOC_FAILED|CUBLAS_STATUS_ALLOC_FAILED",
    re.IGNORECASE,
)


def ran_out_of_memory(error: InferenceError) -> bool:
    return bool(_OUT_OF_MEMORY.search(str(error)))


@dataclass
class Inferred:
    """What one batch's inference found besides the outcomes: the smallest batch that ran out of memory."""

    out_of_memory_at: int | None = None


class Pipeline:
    def __init__(self, detector: Detector, decode_threads: int, metrics: ConsumerMetrics) -> None:
        self.detector = detector
        self._metrics = metrics
        self._decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self._turns = Turns()  # realtime batches infer before bulk batches that wait

    def waiting_for_inference(self) -> int:
        """Decoded batches waiting for the inference thread."""
        return self._turns.waiting()

    async def warm_up(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._infer_pool, self.detector.warm_up)

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._infer_pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, jobs: Sequence[Job]) -> Inferred:
        """Give every job of ``jobs`` that still needs inference its outcome."""
        work = [j for j in jobs if j.needs_inference]
        if not work:
            return Inferred()
        await self._decode(work)
        decoded = [j for j in work if j.needs_inference]
        if not decoded:
            return Inferred()
        self._metrics.batch_size.observe(len(decoded))
        report = Inferred()
        urgent = any(j.task is not None and j.task.lane == "realtime" for j in decoded)
        seconds = await self._infer(decoded, report, urgent)
        self._metrics.inference.observe(seconds)
        for job in decoded:
            job.inference_ms = seconds * 1000
            job.image = None  # the pixels are not needed any more: free them before the sink
        return report

    async def _decode(self, jobs: Sequence[Job]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        size = self.detector.info.input_size
        frames = await asyncio.gather(
            *(
                loop.run_in_executor(self._decode_pool, decode_frame, j.delivery.envelope.body, size)
                for j in jobs
            )
        )
        elapsed = time.perf_counter() - started
        self._metrics.decode.observe(elapsed)
        for job, frame in zip(jobs, frames, strict=True):
            job.decode_ms = elapsed * 1000
            if isinstance(frame, str):
                job.outcome = BadInput(frame)
            else:
                job.image = frame

    async def _infer(self, jobs: list[Job], report: Inferred, urgent: bool) -> float:
        """Infer ``jobs``, splitting them on failure; returns the seconds spent in the runtime."""
        images = [j.image for j in jobs if j.image is not None]
        started = time.perf_counter()
        try:
            async with self._turns.turn(urgent):
                results, seconds = await asyncio.get_running_loop().run_in_executor(
                    self._infer_pool, _timed, self.detector, images
                )
        except InferenceError as error:
            spent = time.perf_counter() - started
            out_of_memory = ran_out_of_memory(error)
            if out_of_memory:
                report.out_of_memory_at = min(report.out_of_memory_at or len(jobs), len(jobs))
            if len(jobs) == 1:
                reason = f"inference failed: {error}"
                jobs[0].outcome = OutOfMemory(reason) if out_of_memory else Transient(reason)
                return spent
            middle = len(jobs) // 2
            first = await self._infer(jobs[:middle], report, urgent)
            return spent + first + await self._infer(jobs[middle:], report, urgent)
        for job, detections, frame in zip(jobs, results, images, strict=True):
            job.outcome = Ok(tuple(detections), *frame.source_size)
        return seconds


def _timed(detector: Detector, images: list[DecodedFrame]) -> tuple[list[list[Detection]], float]:
    """Runs in the inference thread, so the time excludes waiting for the batch ahead."""
    started = time.perf_counter()
    results = detector.detect(images)
    return results, time.perf_counter() - started
