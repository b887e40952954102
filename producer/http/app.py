"""``detfleet gateway``: frames in over HTTP, results out over WebSocket and Server-Sent Events, a live page.

The same wire contract as every gateway (docs/wire-contract.md): a frame is checked as the consumer checks it,
published with a confirm and answered 202 only once the broker confirmed it, so a bulk frame answered 202 is
never lost. See docs/gateway-http.md for the routes, auth, limits and examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib.resources import files
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from producer.http.auth import Identity, retry_after_header
from producer.http.ingest import FRAME_BODY, FrameFields, check_frame, frame_fields, read_frame
from producer.http.live import HeldFrame
from producer.http.metrics import GatewayMetrics
from producer.http.runtime import Gateway
from producer.http.streams import subscribed
from shared.errors import BrokerError, DatabaseError, FrameDroppedError, TaskValidationError
from shared.events import ResultEvent
from shared.schema import NAME_PATTERN, realtime_deadline
from shared.settings import GatewaySettings

logger = logging.getLogger(__name__)

# SSE: a comment this often keeps proxies from closing an idle stream and notices a client that left.
SSE_KEEPALIVE_S = 15.0
# A WebSocket client without a valid token is refused with this close code (policy violation) where the
# server cannot answer the handshake with a plain 401.
WS_POLICY_VIOLATION = 1008

Status = Literal["ok", "failed", "shed"]
SiteFilter = Annotated[str | None, Query(pattern=NAME_PATTERN, description="Only this site")]
CameraFilter = Annotated[str | None, Query(pattern=NAME_PATTERN, description="Only this camera")]
StatusFilter = Annotated[Status | None, Query(description="Only ok, failed or shed")]


def _unavailable(detail: str, retry_after_s: int) -> HTTPException:
    return HTTPException(503, detail, headers={"Retry-After": str(retry_after_s)})


def _field_error(field: str, message: str) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", field), "msg": message, "input": None}]
    )


def past_deadline(captured_at: datetime, budget_ms: int) -> bool:
    return realtime_deadline(captured_at, budget_ms) <= datetime.now(UTC)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def presented_token(authorization: str | None, access_token: str | None) -> str | None:
    """``Authorization: Bearer <token>``, else the ``access_token`` query parameter (browsers cannot set
    headers on a WebSocket or an EventSource)."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return access_token


class RequestCounter:
    """Counts every HTTP request by its route template (not its path: ids would explode the series)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "(unmatched)")
            self._metrics.requests.labels(route, scope["method"], str(status[0])).inc()


def _readable(error: RequestValidationError) -> str:
    parts = []
    for problem in error.errors():
        where = ".".join(str(p) for p in problem.get("loc", ()))
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(settings: GatewaySettings) -> FastAPI:
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(
        title="detfleet HTTP gateway",
        version="1",
        summary="Frames in over HTTP, results out over WebSocket and Server-Sent Events",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.add_middleware(RequestCounter, metrics=gateway.metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        # One readable line naming each field, and the structured list beside it.
        return JSONResponse({"detail": _readable(error), "errors": jsonable_errors(error)}, status_code=422)

    _frame_routes(app, gateway)
    _result_routes(app, gateway)
    _stream_routes(app, gateway)
    _health_routes(app, gateway)
    _page_routes(app, gateway)
    return app


async def identify(
    request: Request,
    access_token: Annotated[
        str | None, Query(description="The bearer token, for clients that cannot send headers")
    ] = None,
) -> Identity:
    """The caller, from ``Authorization: Bearer`` or ``access_token``; 401 without a valid token."""
    gateway: Gateway = request.app.state.gateway
    token = presented_token(request.headers.get("authorization"), access_token)
    identity = gateway.auth.identify(token)
    if identity is None:
        raise _unauthorized("a valid bearer token is required" if token else "bearer token missing")
    return identity


async def reader(identity: Annotated[Identity, Depends(identify)]) -> Identity:
    """A caller that may read results; 403 for a publish-only token."""
    if not identity.read:
        raise HTTPException(403, f"token {identity.name!r} may not read results")
    return identity


def jsonable_errors(error: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in error.errors()
    ]


# ---- frames in ---------------------------------------------------------------------------------------------


class FrameIntake:
    """POST /v1/frames in order: scope, rate, fields, body, image checks, broker state, publish, record."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._settings = gateway.settings

    async def accept(
        self, request: Request, response: Response, fields: FrameFields, identity: Identity
    ) -> dict[str, str]:
        try:
            return await self._accept(request, response, fields, identity)
        except (HTTPException, RequestValidationError) as error:
            status = error.status_code if isinstance(error, HTTPException) else 422
            self._gateway.metrics.refused.labels(str(status)).inc()
            raise

    async def _accept(
        self, request: Request, response: Response, fields: FrameFields, identity: Identity
    ) -> dict[str, str]:
        gateway = self._gateway
        self._admit(fields, identity)
        body = await read_frame(request)
        check_frame(body)
        if not gateway.can_publish:
            raise self._unavailable("the broker is unreachable or blocked: send again later")
        task_id = await self._publish(fields, body)
        await self._remember(task_id, fields)
        media_type = "image/png" if body.startswith(b"\x89PNG") else "image/jpeg"
        gateway.frames.keep(fields.site, fields.camera, HeldFrame(task_id, body, media_type))
        gateway.metrics.accepted.labels(fields.lane).inc()
        location = f"/v1/tasks/{task_id}"
        response.headers["Location"] = location
        return {"task_id": str(task_id), "status": "accepted", "location": location}

    def _admit(self, fields: FrameFields, identity: Identity) -> None:
        """403 outside the token's cameras, 429 over its rate, 422 for a realtime frame already too old."""
        settings = self._settings
        if not identity.may_publish(fields.site, fields.camera):
            raise HTTPException(
                403, f"token {identity.name!r} may not publish for {fields.site}/{fields.camera}"
            )
        wait = self._gateway.limiter.take(identity.name)
        if wait:
            raise HTTPException(
                429,
                f"over {settings.gateway_rate:g} frames/s",
                headers={"Retry-After": retry_after_header(wait)},
            )
        if fields.lane == "realtime" and past_deadline(fields.captured_at, settings.realtime_deadline_ms):
            raise _field_error(
                "captured_at", f"a realtime frame older than {settings.realtime_deadline_ms} ms would be shed"
            )

    def _unavailable(self, detail: str) -> HTTPException:
        return _unavailable(detail, self._settings.gateway_retry_after_s)

    async def _publish(self, fields: FrameFields, body: bytes) -> uuid.UUID:
        started = time.perf_counter()
        try:
            task_id = await self._gateway.publisher.publish(
                body,
                camera=fields.camera,
                site=fields.site,
                lane=fields.lane,
                captured_at=fields.captured_at,
                trace_id=fields.trace_id,
                key=fields.key(body),
                timeout=self._settings.gateway_publish_timeout_s,
            )
        except TaskValidationError as error:
            raise HTTPException(422, str(error)) from None
        except FrameDroppedError as error:
            # A realtime frame whose deadline passed before it could be sent: sending again cannot help.
            raise _field_error("captured_at", f"realtime frame already past its deadline ({error})") from None
        except BrokerError as error:
            # Nacked (lane full), no confirm in time (blocked), lost or returned: never a 202.
            raise self._unavailable(f"not accepted: {error}") from None
        self._gateway.metrics.publish_seconds.observe(time.perf_counter() - started)
        return task_id

    async def _remember(self, task_id: uuid.UUID, fields: FrameFields) -> None:
        try:
            await self._gateway.store.remember(task_id, fields.site, fields.camera, fields.lane)
        except DatabaseError as error:
            # The frame is confirmed and will get its row; only "pending" is lost until then.
            self._gateway.metrics.unremembered.inc()
            logger.warning("Task %s accepted but not recorded: %s", task_id, error)


def _frame_routes(app: FastAPI, gateway: Gateway) -> None:
    intake = FrameIntake(gateway)

    @app.post(
        "/v1/frames",
        status_code=202,
        openapi_extra=FRAME_BODY,
        summary="Publish one frame; 202 once the broker confirmed it",
        responses={
            401: {"description": "No valid bearer token"},
            403: {"description": "The token may not publish for this camera"},
            413: {"description": "Over 8 MiB or 40 megapixels"},
            415: {"description": "Not a JPEG or PNG"},
            422: {"description": "A field or the image header is invalid"},
            429: {"description": "Over the token's rate; see Retry-After"},
            503: {"description": "Broker away, blocked or full; see Retry-After"},
        },
    )
    async def post_frame(
        request: Request,
        response: Response,
        fields: Annotated[FrameFields, Depends(frame_fields)],
        identity: Annotated[Identity, Depends(identify)],
    ) -> dict[str, str]:
        return await intake.accept(request, response, fields, identity)


# ---- results -----------------------------------------------------------------------------------------------


def _result_routes(app: FastAPI, gateway: Gateway) -> None:
    retry_after = gateway.settings.gateway_retry_after_s

    @app.get(
        "/v1/tasks/{task_id}",
        summary="A task's result (200), accepted and pending (202) or unknown (404)",
        responses={
            202: {"description": "Accepted by this gateway, no result yet"},
            404: {"description": "No such task"},
            503: {"description": "Database unreachable"},
        },
    )
    async def get_task(
        task_id: Annotated[uuid.UUID, Path(description="The id POST /v1/frames answered")],
        _: Annotated[Identity, Depends(reader)],
    ) -> JSONResponse:
        try:
            result = await gateway.store.result(task_id)
            accepted = None if result is not None else await gateway.store.accepted(task_id)
        except DatabaseError as error:
            raise _unavailable(f"results unavailable: {error}", retry_after) from None
        if result is not None:
            return JSONResponse(_jsonable({"state": "done", **result}))
        if accepted is not None:
            return JSONResponse(_jsonable({"state": "pending", **accepted}), status_code=202)
        raise HTTPException(404, f"unknown task {task_id}")


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    from fastapi.encoders import jsonable_encoder

    encoded: dict[str, Any] = jsonable_encoder(values)
    return encoded


# ---- result streams ----------------------------------------------------------------------------------------


def _stream_routes(app: FastAPI, gateway: Gateway) -> None:
    settings = gateway.settings

    @app.get(
        "/v1/results/sse",
        summary="Live result events as Server-Sent Events (event: result, id: the task id)",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, 503: {"description": "Broker unreachable"}},
    )
    async def results_sse(
        request: Request,
        status: StatusFilter = None,
        site: SiteFilter = None,
        camera: CameraFilter = None,
        access_token: Annotated[str | None, Query(description="The bearer token")] = None,
    ) -> StreamingResponse:
        _check_reader(gateway, request.headers.get("authorization"), access_token)
        broker = _stream_broker(gateway)
        stream_cm = subscribed(broker, settings.gateway_stream_buffer, status, site, camera)
        try:
            stream = await stream_cm.__aenter__()
        except BrokerError as error:
            raise _unavailable(f"cannot subscribe: {error}", settings.gateway_retry_after_s) from None

        async def events() -> AsyncIterator[str]:
            gateway.metrics.streams.labels("sse").inc()
            try:
                yield ": connected\n\n"
                while True:
                    try:
                        event = await asyncio.wait_for(stream.next(), SSE_KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    yield f"event: result\nid: {event.task_id}\ndata: {event.model_dump_json()}\n\n"
            finally:
                gateway.metrics.streams.labels("sse").dec()
                gateway.metrics.stream_drops.inc(stream.dropped)
                await stream_cm.__aexit__(None, None, None)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.websocket("/v1/results")
    async def results_ws(
        websocket: WebSocket,
        status: StatusFilter = None,
        site: SiteFilter = None,
        camera: CameraFilter = None,
        access_token: str | None = None,
    ) -> None:
        try:
            _check_reader(gateway, websocket.headers.get("authorization"), access_token)
            broker = _stream_broker(gateway)
        except HTTPException as error:
            await _deny(websocket, error)
            return
        try:
            async with subscribed(broker, settings.gateway_stream_buffer, status, site, camera) as stream:
                await websocket.accept()
                gateway.metrics.streams.labels("websocket").inc()
                try:
                    await _pump(websocket, stream)
                finally:
                    gateway.metrics.streams.labels("websocket").dec()
                    gateway.metrics.stream_drops.inc(stream.dropped)
        except BrokerError as error:
            await _deny(websocket, _unavailable(str(error), settings.gateway_retry_after_s))


def _check_reader(gateway: Gateway, authorization: str | None, access_token: str | None) -> Identity:
    token = presented_token(authorization, access_token)
    identity = gateway.auth.identify(token)
    if identity is None:
        raise _unauthorized("a valid bearer token is required" if token else "bearer token missing")
    if not identity.read:
        raise HTTPException(403, f"token {identity.name!r} may not read results")
    return identity


def _stream_broker(gateway: Gateway) -> Any:
    if gateway.broker is None or gateway.broker.is_closed:
        raise _unavailable(
            "the broker is unreachable: no live results", gateway.settings.gateway_retry_after_s
        )
    return gateway.broker


async def _deny(websocket: WebSocket, error: HTTPException) -> None:
    """Refuse the handshake with the HTTP status where the server can, else close with 1008."""
    response = JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:
        await websocket.close(WS_POLICY_VIOLATION, str(error.detail)[:120])


async def _pump(websocket: WebSocket, stream: Any) -> None:
    """Send events until the client goes; its messages are read only to notice that."""

    async def forward() -> None:
        while True:
            event: ResultEvent = await stream.next()
            await websocket.send_text(event.model_dump_json())

    async def until_closed() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await websocket.receive_text()

    sender = asyncio.ensure_future(forward())
    listener = asyncio.ensure_future(until_closed())
    try:
        await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, listener):
            task.cancel()
        await asyncio.gather(sender, listener, return_exceptions=True)


# ---- health and metrics ------------------------------------------------------------------------------------


def _health_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.get("/livez", summary="The process answers")
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/readyz", summary="Broker and database reachable", responses={503: {"description": "Not ready"}}
    )
    async def readyz() -> JSONResponse:
        problems = []
        if not gateway.can_publish:
            problems.append("broker: not connected or blocked")
        if gateway.broker is None or gateway.broker.is_closed:
            problems.append("broker: result streams not connected")
        try:
            await gateway.store.ping()
        except DatabaseError as error:
            problems.append(f"database: {error}")
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(gateway.registry), media_type=CONTENT_TYPE_LATEST)


# ---- the live page -----------------------------------------------------------------------------------------


def _page_routes(app: FastAPI, gateway: Gateway) -> None:
    page = files("producer.http").joinpath("static/index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/v1/fleet", summary="The fleet's figures (detfleet status --json), refreshed every few seconds")
    async def fleet(_: Annotated[Identity, Depends(reader)]) -> dict[str, Any]:
        return await gateway.fleet.current()

    @app.get(
        "/v1/cameras/{site}/{camera}/frame",
        summary="The latest frame this gateway accepted for a camera (header X-Detfleet-Task-Id)",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}, 404: {"description": "None held"}},
    )
    async def latest_frame(
        site: Annotated[str, Path(pattern=NAME_PATTERN)],
        camera: Annotated[str, Path(pattern=NAME_PATTERN)],
        _: Annotated[Identity, Depends(reader)],
    ) -> Response:
        held = gateway.frames.latest(site, camera)
        if held is None:
            raise HTTPException(404, f"no frame of {site}/{camera} came through this gateway")
        headers = {"X-Detfleet-Task-Id": str(held.task_id), "Cache-Control": "no-store"}
        return Response(held.body, media_type=held.content_type, headers=headers)
