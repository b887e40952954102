"""The published wire contract is enough: a gateway built only from docs/asyncapi.json, with plain pika and
no detfleet import, gets an ok row."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

from consumer.detector.fake import FakeDetector
from shared.settings import AdminSettings
from tests.integration.consumer_support import consumer_settings, jpeg, rows_by_id, run_until_idle

ROOT = Path(__file__).parents[2]


async def test_a_frame_built_from_the_asyncapi_document_alone_gets_an_ok_row(
    topology_settings: AdminSettings, results_db: str, tmp_path: Path
) -> None:
    (tmp_path / "frame.jpg").write_bytes(jpeg(7))
    script = ROOT / "tests" / "support" / "plain_gateway.py"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-I", str(script), str(ROOT / "docs" / "asyncapi.json"), topology_settings.amqp_url,
        "line-9", "cam-plain", str(tmp_path / "frame.jpg"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    task_id = uuid.UUID(out.decode().strip())

    await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())

    row = (await rows_by_id(results_db))[task_id]
    assert (row["status"], row["site"], row["camera_id"], row["lane"]) == (
        "ok",
        "line-9",
        "cam-plain",
        "bulk",
    )
