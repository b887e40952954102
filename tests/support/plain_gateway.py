"""A gateway that knows detfleet only from docs/asyncapi.json: plain pika, no detfleet import.

``python tests/support/plain_gateway.py ASYNCAPI_JSON AMQP_URL SITE CAMERA IMAGE`` publishes IMAGE as one
bulk frame, built from what the document says (exchange, routing key, properties, required headers), waits
for the broker's confirm and prints the task id. It sends no x-detfleet-attempt header: the document says
an absent one means the first attempt.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pika

DETFLEET_PACKAGES = {"detfleet", "shared", "producer", "consumer"}


def headers_for(contract: dict[str, object], site: str, camera: str) -> dict[str, object]:
    """The required headers, each from what the document says it is."""
    schema = contract["components"]["messages"]["frame"]["headers"]  # type: ignore[index]
    values = {
        "site": site,
        "camera_id": camera,
        "captured_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "trace_id": "plain-" + uuid.uuid4().hex[:12],
    }
    headers: dict[str, object] = {}
    for name in schema["required"]:
        spec = schema["properties"][name]
        headers[name] = spec["const"] if "const" in spec else values[name]
    return headers


def main(contract_path: str, amqp_url: str, site: str, camera: str, image: str) -> None:
    contract = json.loads(Path(contract_path).read_text())
    channel_spec = contract["channels"]["frames"]
    exchange = channel_spec["bindings"]["amqp"]["exchange"]["name"]
    key = channel_spec["address"].format(lane="bulk", site=site, camera=camera)
    publish = contract["operations"]["publishFrame"]["bindings"]["amqp"]
    task_id = str(uuid.uuid4())
    properties = pika.BasicProperties(
        message_id=task_id,
        delivery_mode=publish["deliveryMode"],
        content_type="image/jpeg",
        headers=headers_for(contract, site, camera),
    )
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(exchange, key, Path(image).read_bytes(), properties, mandatory=publish["mandatory"])
    connection.close()
    loaded = sorted({m.split(".")[0] for m in sys.modules} & DETFLEET_PACKAGES)
    assert not loaded, f"imported {loaded}"
    print(task_id)


if __name__ == "__main__":
    main(*sys.argv[1:6])
