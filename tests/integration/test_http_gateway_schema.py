"""schemathesis against the live gateway's OpenAPI: generated requests (valid and not) get no server error.

Bounded (a few examples per operation) so that it stays well under a minute; the SSE stream never ends by
design and is left out (test_http_gateway.py covers it).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from shared.settings import AdminSettings
from tests.integration.http_gateway_support import ADMIN_TOKEN, gateway_settings, serving

MAX_EXAMPLES = 15
RUN_LIMIT_S = 120  # bound against a hang


@pytest.mark.timeout(RUN_LIMIT_S + 30)
async def test_generated_requests_get_no_server_error(
    topology_settings: AdminSettings, results_db: str, tmp_path: Path
) -> None:
    # A rate no generated burst reaches: 429s would only hide what the routes themselves answer.
    settings = gateway_settings(
        topology_settings.amqp_url, results_db, gateway_rate=10_000, gateway_burst=10_000
    )
    async with serving(settings) as http:
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{http.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--phases",
            "examples,coverage,fuzzing",
            "--exclude-path",
            "/v1/results/sse",
            "--header",
            f"Authorization: Bearer {ADMIN_TOKEN}",
            "--generation-database",
            "none",
            "--seed",
            "16",
            "--request-timeout",
            "20",
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), RUN_LIMIT_S)
    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-6000:]
