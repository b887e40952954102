"""``detfleet results forward --webhook``: result events POSTed to an endpoint, signed, in order per camera.

- **Queue.** A durable queue of its own, ``detfleet.results.webhook.<name>``, bound to the chosen routing
  keys: events that arrive while the forwarder is stopped wait there.
- **Signature.** Each POST carries ``X-Detfleet-Timestamp`` (Unix seconds) and ``X-Detfleet-Signature:
  sha256=<hex>``, the HMAC-SHA256 under the shared secret of ``<timestamp>.<body>`` (as Stripe signs its
  webhooks): the receiver recomputes it, compares in constant time and refuses old timestamps (replays).
- **Retries.** Connection errors, timeouts, 408, 429 and 5xx are retried with exponential backoff and
  jitter (tenacity), or after the endpoint's ``Retry-After`` seconds when it sends them; after
  ``DETFLEET_WEBHOOK_MAX_ATTEMPTS`` POSTs, or at once for any other 4xx, the event is published to the
  parking lot ``<queue>.parked`` with ``x-detfleet-reason`` and then acked.
- **Order.** Events of one camera are POSTed one at a time, in the order the queue holds them; cameras go
  side by side, up to ``DETFLEET_WEBHOOK_PREFETCH`` events held at once. An event is acked only once its
  POST succeeded or it was parked, so a stop or crash hands the rest back to the broker (at least once).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from shared.broker.aio import Broker, Delivery, Subscription
from shared.errors import BrokerUnavailableError, DetfleetError, TaskValidationError
from shared.events import UNKNOWN, ResultEvent
from shared.schema import H_REASON
from shared.settings import SubscriberSettings
from shared.topology import EXCHANGE_RESULTS, Topology, parked_queue

logger = logging.getLogger(__name__)

H_TIMESTAMP = "X-Detfleet-Timestamp"
H_SIGNATURE = "X-Detfleet-Signature"
H_EVENT_ID = "X-Detfleet-Event-Id"  # the task id: receivers dedupe by it (delivery is at least once)
SIGNATURE_SCHEME = "sha256"
DEFAULT_TOLERANCE_S = 300
H_PARK_ATTEMPTS = "x-detfleet-webhook-attempts"
# Statuses worth another try: the endpoint is overloaded, restarting or timed the request out.
RETRYABLE_STATUSES = frozenset({408, 429})
STOP_GRACE_S = 10.0

T = TypeVar("T")


# ---- signatures --------------------------------------------------------------------------------------------


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 under ``secret`` of ``<timestamp>.<body>``."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_SCHEME}={digest}"


def signed_headers(secret: bytes, body: bytes, event_id: str, now: float | None = None) -> dict[str, str]:
    """The headers of one POST; a retry is signed again, with its own timestamp."""
    timestamp = str(int(time.time() if now is None else now))
    return {
        "Content-Type": "application/json",
        H_TIMESTAMP: timestamp,
        H_SIGNATURE: signature(secret, timestamp, body),
        H_EVENT_ID: event_id,
    }


def verify(
    secret: bytes,
    timestamp: str,
    body: bytes,
    header: str,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent (no replay of old POSTs)."""
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except ValueError:
        return False
    if abs(age) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), header)


# ---- per-camera order ------------------------------------------------------------------------------------


class KeyedLanes(Generic[T]):
    """Items of one key handled one at a time in submission order; different keys side by side.

    One task per key that has work, which ends when its lane is empty (a fleet of a thousand cameras does not
    keep a thousand idle tasks). ``work`` must not raise: an error stops that lane and is passed to
    ``on_error``; its remaining items are left unhandled (unacked: the broker gives them back).
    """

    def __init__(
        self, work: Callable[[T], Awaitable[None]], on_error: Callable[[BaseException], None]
    ) -> None:
        self._work = work
        self._on_error = on_error
        self._lanes: dict[str, collections.deque[T]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    def submit(self, key: str, item: T) -> None:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = collections.deque()
            self._tasks[key] = asyncio.create_task(self._drain(key, lane), name=f"lane {key}")
        lane.append(item)

    @property
    def busy(self) -> int:
        """Keys with work now."""
        return len(self._tasks)

    async def _drain(self, key: str, lane: collections.deque[T]) -> None:
        try:
            while lane and not self._stopping:
                await self._work(lane[0])
                lane.popleft()
        except Exception as error:  # a bug or a lost broker: stop, leave the rest to the broker
            self._on_error(error)
        finally:
            # No await between the last check of ``lane`` and this: a submit cannot slip in between.
            del self._lanes[key]
            del self._tasks[key]

    async def stop(self, grace_s: float) -> None:
        """Finish the item each lane is on (up to ``grace_s``), start no other; cancel what is left."""
        self._stopping = True
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


# ---- delivering one event ----------------------------------------------------------------------------------


class _StopWhenSet(stop_base):
    """tenacity's stop_when_event_set, for an asyncio event."""

    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._event.is_set()


class RetryableFailure(Exception):
    """A POST that may work if tried again: no connection, a timeout, 408, 429 or 5xx. ``retry_after``:
    the seconds the endpoint asked us to wait (its ``Retry-After`` header), if it said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds; the HTTP-date form and nonsense are ignored (our backoff applies)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


class WaitRespectingRetryAfter(wait_base):
    """The endpoint's ``Retry-After`` when it gave one (at most ``cap_s``), else ``fallback``."""

    def __init__(self, fallback: wait_base, cap_s: float) -> None:
        self._fallback = fallback
        self._cap_s = cap_s

    def __call__(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, RetryableFailure) and error.retry_after is not None:
            return min(error.retry_after, self._cap_s)
        return float(self._fallback(retry_state))


@dataclass
class PostCount:
    value: int = 0


class Refused(Exception):
    """The endpoint refused the event for good (a 4xx other than 408 and 429): park it at once."""


@dataclass(frozen=True)
class WebhookOptions:
    url: str
    queue: str
    keys: tuple[str, ...]
    secret: bytes


@dataclass
class ForwardReport:
    delivered: int = 0
    parked: int = 0
    retries: int = 0


def _describe(response: aiohttp.ClientResponse, text: str) -> str:
    snippet = " ".join(text.split())[:200]
    return f"HTTP {response.status} {response.reason or ''}".strip() + (f": {snippet}" if snippet else "")


class Forwarder:
    """Consumes a webhook queue and POSTs each event; see the module docstring."""

    def __init__(
        self,
        broker: Broker,
        http: aiohttp.ClientSession,
        settings: SubscriberSettings,
        options: WebhookOptions,
        stopping: asyncio.Event,
    ) -> None:
        self._broker = broker
        self._http = http
        self._settings = settings
        self._options = options
        self._stopping = stopping
        self.report = ForwardReport()
        self.failure: BaseException | None = None
        self._lanes: KeyedLanes[Delivery] = KeyedLanes(self._deliver, self._fail)
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        """Declare the parking lot and the queue with its bindings, and start consuming."""
        if not await self._broker.exchange_exists(EXCHANGE_RESULTS):
            raise DetfleetError(f"exchange {EXCHANGE_RESULTS} is not declared: run detfleet topology apply")
        await self._broker.declare(Topology.parking_lot(self._options.queue))
        self._subscription = await self._broker.subscribe(
            EXCHANGE_RESULTS,
            self._options.keys,
            self._on_delivery,
            prefetch=self._settings.webhook_prefetch,
            queue=self._options.queue,
        )

    async def stop(self) -> None:
        """No new deliveries; the POST in flight of each camera finishes (or is handed back); close."""
        if self._subscription is not None:
            await self._subscription.cancel()
        await self._lanes.stop(STOP_GRACE_S)
        if self._subscription is not None:
            await self._subscription.close()

    def _fail(self, error: BaseException) -> None:
        logger.error("Forwarding stopped: %s", error)
        self.failure = error
        self._stopping.set()

    async def _on_delivery(self, delivery: Delivery) -> None:
        # Synchronous up to submit: deliveries reach their lane in the order the broker sent them.
        self._lanes.submit(camera_key(delivery), delivery)

    async def _deliver(self, delivery: Delivery) -> None:
        body = delivery.envelope.body
        event_id = delivery.envelope.message_id or ""
        posts = PostCount()
        try:
            await self._post_until_it_works(body, event_id, posts)
        except Refused as why:
            await self._park(delivery, str(why), posts.value)
        except RetryableFailure as why:
            if self._stopping.is_set():
                return  # stopped between tries: unacked, the broker hands it to the next run
            await self._park(delivery, f"gave up after {posts.value} tries: {why}", posts.value)
        else:
            self.report.delivered += 1
            self.report.retries += posts.value - 1
            await delivery.ack()

    async def _post_until_it_works(self, body: bytes, event_id: str, posts: PostCount) -> None:
        """POST until the endpoint takes it, counting the POSTs in ``posts``."""

        async def sleep(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)

        def log(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            logger.warning(
                "POST of %s failed (try %d), again in %.2f s: %s", event_id, state.attempt_number, wait, error
            )

        s = self._settings
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(RetryableFailure),
            wait=WaitRespectingRetryAfter(
                wait_exponential(multiplier=s.webhook_backoff_s, max=s.webhook_max_backoff_s)
                + wait_random(0, s.webhook_backoff_s),
                cap_s=s.webhook_max_backoff_s,
            ),
            stop=stop_after_attempt(s.webhook_max_attempts) | _StopWhenSet(self._stopping),
            sleep=sleep,
            before_sleep=log,
            reraise=True,
        )

        async def post() -> None:
            if posts.value and self._stopping.is_set():
                raise RetryableFailure("the forwarder is stopping")  # a stop cut the wait short: no POST
            posts.value += 1
            await self._post_once(body, event_id)

        await retrying(post)

    async def _post_once(self, body: bytes, event_id: str) -> None:
        headers = signed_headers(self._options.secret, body, event_id)
        timeout = aiohttp.ClientTimeout(total=self._settings.webhook_timeout_s)
        try:
            async with self._http.post(
                self._options.url, data=body, headers=headers, timeout=timeout
            ) as response:
                text = await response.text(errors="replace")
        except TimeoutError as error:
            raise RetryableFailure(f"no answer in {self._settings.webhook_timeout_s:g} s") from error
        except aiohttp.ClientError as error:
            raise RetryableFailure(f"{type(error).__name__}: {error}") from error
        if response.status < 300:
            return
        if response.status >= 500 or response.status in RETRYABLE_STATUSES:
            raise RetryableFailure(
                _describe(response, text), retry_after_s(response.headers.get("Retry-After"))
            )
        raise Refused(_describe(response, text))

    async def _park(self, delivery: Delivery, reason: str, attempts: int) -> None:
        envelope = delivery.envelope
        headers = {**envelope.headers, H_REASON: reason, H_PARK_ATTEMPTS: attempts}
        await self._broker.publish(replace(envelope, headers=headers), parked_queue(self._options.queue))
        self.report.parked += 1
        logger.warning("Parked %s in %s: %s", envelope.message_id, parked_queue(self._options.queue), reason)
        await delivery.ack()


def camera_key(delivery: Delivery) -> str:
    """The lane of an event: its site and camera from the routing key (``<status>.<site>.<camera>``).

    The key, not the body, so an event that is no valid event still gets a lane (and is delivered, or parked
    by the endpoint's answer, like any other)."""
    parts = delivery.envelope.routing_key.split(".")
    if len(parts) == 3:
        return f"{parts[1]}.{parts[2]}"
    try:
        event = ResultEvent.from_json(delivery.envelope.body)
    except TaskValidationError:
        return UNKNOWN
    return f"{event.site or UNKNOWN}.{event.camera_id or UNKNOWN}"


async def forward(
    broker: Broker,
    settings: SubscriberSettings,
    options: WebhookOptions,
    stopping: asyncio.Event,
    ready: Callable[[], None] = lambda: None,
) -> ForwardReport:
    """Forward until ``stopping`` is set, or the broker is lost (then :class:`BrokerUnavailableError`)."""
    broker.on_close(lambda loss: stopping.set())
    async with aiohttp.ClientSession() as http:
        forwarder = Forwarder(broker, http, settings, options, stopping)
        await forwarder.start()
        ready()
        try:
            await stopping.wait()
        finally:
            await forwarder.stop()
    if forwarder.failure is not None:
        raise BrokerUnavailableError(f"forwarding {options.queue} stopped: {forwarder.failure}")
    if broker.is_closed:
        raise BrokerUnavailableError(
            f"forwarding {options.queue} stopped: the broker connection was lost (unacked events stay queued)"
        )
    return forwarder.report
