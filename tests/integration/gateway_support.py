"""``detfleet produce`` as a long-running gateway process: started, watched through its log, stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STOP_LIMIT_S = 60  # bounds against a hang, not timing assertions


@dataclass
class Gateway:
    process: asyncio.subprocess.Process
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self) -> dict[str, Any]:
        """SIGTERM, as an operator stops it; returns the JSON summary it prints on the way out."""
        self.process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(self.process.communicate(), STOP_LIMIT_S)
        assert self.process.returncode == 0, self.log_text()[-3000:]
        summary: dict[str, Any] = json.loads(out)
        return summary


def gateway_env(amqp_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")}
    return env | {"DETFLEET_AMQP_URL": amqp_url, "DETFLEET_LOG_JSON": "false"}


@contextlib.asynccontextmanager
async def gateway(amqp_url: str, log: Path, *args: str) -> AsyncIterator[Gateway]:
    """``detfleet produce ARGS --json`` running; killed on the way out if the test did not stop it."""
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "detfleet",
            "produce",
            *args,
            "--json",
            env=gateway_env(amqp_url),
            stdout=asyncio.subprocess.PIPE,
            stderr=output,
        )
    try:
        yield Gateway(process, log)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
