"""The blocking publisher for gateway code that has no event loop.

It runs an :class:`~producer.publisher.AsyncPublisher` on an event loop in a background thread, so the
blocking API gets exactly the same buffering, reconnects, backpressure and metrics, and a camera loop's
call never waits on the network longer than the publisher's timeouts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import Coroutine
from datetime import datetime
from typing import Any, TypeVar

from producer.metrics import ProducerMetrics
from producer.publisher import AsyncPublisher
from shared.settings import Lane, ProducerSettings

T = TypeVar("T")


class BlockingPublisher:
    """Thread-side API: ``with BlockingPublisher(settings) as publisher: publisher.publish(...)``.

    Connects in the constructor (raising :class:`~shared.errors.BrokerUnavailableError` or another
    :class:`~shared.errors.BrokerError` when it cannot). Safe to call from several threads.
    """

    def __init__(
        self,
        settings: ProducerSettings,
        *,
        metrics: ProducerMetrics | None = None,
        deterministic_ids: bool = False,
        connection_name: str | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="detfleet-publisher", daemon=True)
        self._thread.start()
        self._publisher = AsyncPublisher(
            settings, metrics=metrics, deterministic_ids=deterministic_ids, connection_name=connection_name
        )
        try:
            self._call(self._publisher.start())
        except BaseException:
            self._stop_loop()
            raise

    def __enter__(self) -> BlockingPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def metrics(self) -> ProducerMetrics:
        return self._publisher.metrics

    def publish(
        self,
        frame: bytes,
        *,
        camera: str,
        site: str,
        lane: Lane | None = None,
        captured_at: datetime | None = None,
        deadline: datetime | None = None,
        trace_id: str | None = None,
        key: str | None = None,
        timeout: float | None = None,
    ) -> uuid.UUID:
        """Publish one frame and return its task id once confirmed; errors as
        :meth:`AsyncPublisher.publish <producer.publisher.AsyncPublisher.publish>`."""
        return self._call(
            self._publisher.publish(
                frame,
                camera=camera,
                site=site,
                lane=lane,
                captured_at=captured_at,
                deadline=deadline,
                trace_id=trace_id,
                key=key,
                timeout=timeout,
            )
        )

    def submit(
        self,
        frame: bytes,
        *,
        camera: str,
        site: str,
        lane: Lane | None = None,
        captured_at: datetime | None = None,
        deadline: datetime | None = None,
        trace_id: str | None = None,
        key: str | None = None,
    ) -> concurrent.futures.Future[uuid.UUID]:
        """Queue one frame without waiting for its confirm; blocks only while the bulk buffer is full."""
        return self._call(
            self._submit(
                frame,
                camera=camera,
                site=site,
                lane=lane,
                captured_at=captured_at,
                deadline=deadline,
                trace_id=trace_id,
                key=key,
            )
        )

    def flush(self, timeout: float | None = None) -> None:
        self._call(self._publisher.flush(timeout))

    def close(self, timeout: float | None = None) -> None:
        """Flush for up to ``timeout``, close the connection and stop the thread; safe to call twice."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._publisher.close(timeout))
        finally:
            self._stop_loop()

    async def _submit(self, frame: bytes, **fields: Any) -> concurrent.futures.Future[uuid.UUID]:
        outcome = await self._publisher.submit(frame, **fields)
        result: concurrent.futures.Future[uuid.UUID] = concurrent.futures.Future()
        outcome.add_done_callback(lambda done: _copy_outcome(done, result))
        return result

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def _copy_outcome(done: asyncio.Future[uuid.UUID], result: concurrent.futures.Future[uuid.UUID]) -> None:
    if done.cancelled():
        result.cancel()
    elif (error := done.exception()) is not None:
        result.set_exception(error)
    else:
        result.set_result(done.result())


__all__ = ["BlockingPublisher"]
