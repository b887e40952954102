"""The wire contract as an AsyncAPI 3.0 document, generated from :mod:`shared.schema` and the topology.

``python -m shared.asyncapi > docs/asyncapi.json`` writes it; a unit test keeps the file equal to what this
module generates, so the published contract cannot drift from the code that enforces it. Gateway authors
read ``docs/wire-contract.md`` beside it.
"""

from __future__ import annotations

import json
from typing import Any

from shared.frames import MAX_FRAME_BYTES, MAX_FRAME_PIXELS
from shared.schema import (
    H_ATTEMPT,
    H_CAMERA,
    H_CAPTURED_AT,
    H_DEADLINE,
    H_PUBLISHED_AT,
    H_SCHEMA,
    H_SITE,
    H_TRACE_ID,
    LANES,
    NAME_PATTERN,
    SCHEMA_VERSION,
    Task,
)
from shared.topology import EXCHANGE_FRAMES

AMQP_BINDING = "0.3.0"


def _field(name: str) -> dict[str, Any]:
    """The JSON schema pydantic derives for one Task field: the same constraints the consumer enforces."""
    schema: dict[str, Any] = dict(Task.model_json_schema()["properties"][name])
    schema.pop("title", None)
    if "anyOf" in schema:  # optional fields: keep the non-null branch
        [schema] = [branch for branch in schema["anyOf"] if branch.get("type") != "null"]
    return schema


def headers_schema() -> dict[str, Any]:
    attempt = _field("attempt") | {"type": "integer", "default": 1}
    return {
        "type": "object",
        "required": [H_SCHEMA, H_SITE, H_CAMERA, H_CAPTURED_AT, H_TRACE_ID],
        "properties": {
            H_SCHEMA: {
                "type": "integer",
                "const": SCHEMA_VERSION,
                "description": "Wire contract version. A newer version is refused as unsupported.",
            },
            H_SITE: _field("site") | {"description": "Site name; must equal the routing key's <site>."},
            H_CAMERA: _field("camera_id")
            | {"description": "Camera id; must equal the routing key's <camera>."},
            H_CAPTURED_AT: {
                "type": "string",
                "format": "date-time",
                "description": "When the camera took the frame: RFC 3339 with a zone, e.g. "
                "2026-11-23T08:00:00.123Z.",
            },
            H_TRACE_ID: _field("trace_id")
            | {"description": "Follows the frame through every log line and onto its result row."},
            H_ATTEMPT: attempt
            | {
                "description": "Delivery attempt, starting at 1 (never 0). Absent means 1: a gateway "
                "need not send it; consumers raise it on each retry."
            },
            H_DEADLINE: {
                "type": "string",
                "format": "date-time",
                "description": "Optional. Past it, a realtime frame is shed and a bulk one fails, "
                "without inference.",
            },
            H_PUBLISHED_AT: {
                "type": "integer",
                "minimum": 0,
                "description": "Optional. When the gateway sent the message, in milliseconds since the "
                "Unix epoch (UTC); the consumer's queue wait starts here. Absent: the timestamp property "
                "(whole seconds) is used.",
            },
        },
    }


def properties_schema() -> dict[str, Any]:
    """The AMQP basic properties of a frame (AsyncAPI's AMQP binding has no place for them)."""
    return {
        "type": "object",
        "required": ["message_id", "delivery_mode"],
        "properties": {
            "message_id": {
                "type": "string",
                "format": "uuid",
                "description": "The task id. The same frame sent again must carry the same id: "
                "consumers keep one result row per id and count the rest as redeliveries.",
            },
            "delivery_mode": {"type": "integer", "const": 2, "description": "Persistent."},
            "timestamp": {
                "type": "integer",
                "description": "Optional. AMQP timestamp, whole seconds since the Unix epoch.",
            },
            "app_id": {
                "type": "string",
                "maxLength": 255,
                "description": "Optional. The gateway's name, stored on the row.",
            },
            "content_type": {"type": "string", "enum": ["image/jpeg", "image/png"]},
            "expiration": {
                "type": "string",
                "description": "Optional, realtime only: milliseconds left until the deadline.",
            },
        },
    }


def document() -> dict[str, Any]:
    message = {
        "name": "frame",
        "title": "A detection task: one encoded camera frame",
        "contentType": "image/jpeg",
        "headers": headers_schema(),
        "payload": {
            "type": "string",
            "format": "binary",
            "maxLength": MAX_FRAME_BYTES,
            "description": f"The encoded image as captured: JPEG or PNG, at most {MAX_FRAME_BYTES} bytes "
            f"and {MAX_FRAME_PIXELS} pixels.",
        },
        "x-amqp-properties": properties_schema(),
        "bindings": {"amqp": {"messageType": "detfleet.frame", "bindingVersion": AMQP_BINDING}},
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "detfleet frames",
            "version": str(SCHEMA_VERSION),
            "description": "What a camera gateway publishes to detfleet. Generated by "
            "`python -m shared.asyncapi`; docs/wire-contract.md explains it.",
        },
        "servers": {
            "broker": {"host": "127.0.0.1:5672", "protocol": "amqp", "protocolVersion": "0.9.1"},
        },
        "channels": {
            "frames": {
                "address": "{lane}.{site}.{camera}",
                "parameters": {
                    "lane": {"enum": list(LANES), "description": "realtime or bulk"},
                    "site": {"description": f"Site name, {NAME_PATTERN}"},
                    "camera": {"description": f"Camera id, {NAME_PATTERN}"},
                },
                "messages": {"frame": {"$ref": "#/components/messages/frame"}},
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": {"name": EXCHANGE_FRAMES, "type": "topic", "durable": True},
                        "bindingVersion": AMQP_BINDING,
                    }
                },
            }
        },
        "operations": {
            "publishFrame": {
                "action": "send",
                "channel": {"$ref": "#/channels/frames"},
                "messages": [{"$ref": "#/channels/frames/messages/frame"}],
                "bindings": {"amqp": {"deliveryMode": 2, "mandatory": True, "bindingVersion": AMQP_BINDING}},
            }
        },
        "components": {"messages": {"frame": message}},
    }


def render() -> str:
    return json.dumps(document(), indent=2) + "\n"


if __name__ == "__main__":
    print(render(), end="")
