"""A POSTed frame: its fields (query parameters or headers), its body (raw or multipart, read with a limit)
and the checks the consumer will make, as HTTP answers (413, 415, 422) before anything is published."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import AwareDatetime
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from shared.errors import FrameRejectedError, FrameTooLargeError, NotAnImageError
from shared.frames import MAX_FRAME_BYTES, inspect_frame
from shared.schema import NAME_PATTERN
from shared.settings import Lane

RAW_TYPES = ("image/jpeg", "image/png")
MULTIPART = "multipart/form-data"
# A multipart body carries its boundaries and part headers beside the image.
MULTIPART_SLACK = 64 * 1024
FRAME_FIELD = "frame"

# The request body as OpenAPI describes it (the route reads the stream itself, with a limit).
FRAME_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The encoded image as captured (JPEG or PNG, at most 8 MiB and 40 megapixels), as the "
        "raw body or as the multipart file field `frame`.",
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "required": [FRAME_FIELD],
                    "properties": {FRAME_FIELD: {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}


@dataclass(frozen=True)
class FrameFields:
    site: str
    camera: str
    lane: Lane
    captured_at: datetime
    trace_id: str | None
    frame_id: str | None

    def key(self, body: bytes) -> str:
        """What names the frame within its camera: the client's frame id, else the content's hash, so the
        same image sent again is the same task (the consumers keep one row per task)."""
        if self.frame_id is not None:
            return f"id:{self.frame_id}"
        return "sha256:" + hashlib.sha256(body).hexdigest()


def _missing(name: str, header: str) -> RequestValidationError:
    return RequestValidationError(
        [
            {
                "type": "missing",
                "loc": ("query", name),
                "msg": f"Field required (query parameter {name} or header {header})",
                "input": None,
            }
        ]
    )


_NAME = NAME_PATTERN
_TRACE = r"^[^\x00]+$"


async def frame_fields(
    site: Annotated[str | None, Query(pattern=_NAME, description="Site (or header X-Detfleet-Site)")] = None,
    camera: Annotated[
        str | None, Query(pattern=_NAME, description="Camera (or header X-Detfleet-Camera)")
    ] = None,
    lane: Annotated[Lane | None, Query(description="realtime or bulk (default bulk)")] = None,
    captured_at: Annotated[
        AwareDatetime | None, Query(description="RFC 3339 with a zone; default the time of the request")
    ] = None,
    trace_id: Annotated[
        str | None, Query(min_length=1, max_length=128, pattern=_TRACE, description="Carried onto the row")
    ] = None,
    frame_id: Annotated[
        str | None,
        Query(min_length=1, max_length=256, description="The client's name for the frame; default its hash"),
    ] = None,
    x_detfleet_site: Annotated[str | None, Header(pattern=_NAME)] = None,
    x_detfleet_camera: Annotated[str | None, Header(pattern=_NAME)] = None,
    x_detfleet_lane: Annotated[Lane | None, Header()] = None,
    x_detfleet_captured_at: Annotated[AwareDatetime | None, Header()] = None,
    x_detfleet_trace_id: Annotated[str | None, Header(min_length=1, max_length=128, pattern=_TRACE)] = None,
    x_detfleet_frame_id: Annotated[str | None, Header(min_length=1, max_length=256)] = None,
) -> FrameFields:
    """The frame's fields from the query string, else from ``X-Detfleet-*`` headers (async: FastAPI runs a
    plain function dependency in a worker thread, which costs more than the work)."""
    chosen_site = site or x_detfleet_site
    chosen_camera = camera or x_detfleet_camera
    if chosen_site is None:
        raise _missing("site", "X-Detfleet-Site")
    if chosen_camera is None:
        raise _missing("camera", "X-Detfleet-Camera")
    return FrameFields(
        site=chosen_site,
        camera=chosen_camera,
        lane=lane or x_detfleet_lane or "bulk",
        captured_at=captured_at or x_detfleet_captured_at or datetime.now(UTC),
        trace_id=trace_id or x_detfleet_trace_id,
        frame_id=frame_id or x_detfleet_frame_id,
    )


def _too_large(size: int | str) -> HTTPException:
    return HTTPException(413, f"frame is {size} bytes, over the {MAX_FRAME_BYTES}-byte limit")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_limited(stream: AsyncIterator[bytes], limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise _too_large(f"over {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


async def _replay(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def _multipart_frame(request: Request, body: bytes) -> bytes:
    parser = MultiPartParser(request.headers, _replay(body), max_files=1, max_fields=16)
    parser.max_part_size = MAX_FRAME_BYTES + 1
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise RequestValidationError(
            [{"type": "multipart", "loc": ("body",), "msg": error.message, "input": None}]
        ) from None
    try:
        upload = form.get(FRAME_FIELD)
        if not isinstance(upload, UploadFile):
            raise RequestValidationError(
                [
                    {
                        "type": "missing",
                        "loc": ("body", FRAME_FIELD),
                        "msg": f"Field required (a file part named {FRAME_FIELD})",
                        "input": None,
                    }
                ]
            )
        return await upload.read()
    finally:
        await form.close()


async def read_frame(request: Request) -> bytes:
    """The image bytes of a raw or multipart body; 413 past the limit (read no further), 415 for any other
    content type."""
    media_type = _media_type(request)
    if media_type not in (*RAW_TYPES, MULTIPART):
        raise HTTPException(415, f"Content-Type must be image/jpeg, image/png or {MULTIPART}")
    limit = MAX_FRAME_BYTES + (MULTIPART_SLACK if media_type == MULTIPART else 0)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(declared)
    body = await _read_limited(request.stream(), limit)
    return await _multipart_frame(request, body) if media_type == MULTIPART else body


def check_frame(body: bytes) -> None:
    """The consumer's own checks (shared.frames): 413 over a limit, 415 not an image, 422 broken header."""
    try:
        inspect_frame(body)
    except FrameTooLargeError as error:
        raise HTTPException(413, str(error)) from None
    except NotAnImageError as error:
        raise HTTPException(415, str(error)) from None
    except FrameRejectedError as error:
        raise RequestValidationError(
            [{"type": "image", "loc": ("body",), "msg": str(error), "input": None}]
        ) from None
