"""Every command fails the same way: one line on stderr naming what is wrong, no traceback; exit 1 for a
service that is away or refuses us, 2 for a bad input file; nothing on stdout, so a ``--json`` pipe never
reads an error as data."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import pytest

from shared.settings import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL
from tests.integration.consumer_support import RUN_TIMEOUT_S


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


AMQP = DEFAULT_AMQP_URL.rstrip("/")
DATABASE = DEFAULT_DATABASE_URL.rsplit("/", 1)[0]

CASES = {
    "broker unreachable": (
        {"DETFLEET_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{closed_port()}/"},
        "unreachable",
    ),
    "login refused": (
        {"DETFLEET_AMQP_URL": AMQP.replace("guest:guest", "guest:wrong") + "/"},
        "login refused",
    ),
    "no such vhost": (
        {"DETFLEET_AMQP_URL": AMQP + "/detfleet-no-such-vhost"},
        "vhost 'detfleet-no-such-vhost'",
    ),
    "no such role": ({"DETFLEET_DATABASE_URL": "postgresql://detfleet_nobody@127.0.0.1:5432/x"}, "role"),
    "no such database": ({"DETFLEET_DATABASE_URL": f"{DATABASE}/detfleet_no_such_db"}, "does not exist"),
    "missing model": ({"DETFLEET_MODEL_PATH": "/nonexistent/model.onnx"}, "cannot read model"),
}
EXIT_CODES = {case: 2 if case == "missing model" else 1 for case in CASES}
# Which case each command meets (a command that never opens a service has no case for it).
COMMANDS = {
    ("consume", "--health-port", "0"): list(CASES.keys() - {"broker unreachable"}),  # a replica waits for it
    ("dlq", "list", "--json"): ["no such role", "no such database"],
    ("dlq", "replay", "--all", "--json"): ["broker unreachable", "login refused", "no such vhost"],
    ("topology", "apply"): ["broker unreachable", "login refused", "no such vhost"],
    ("db", "migrate"): ["no such role"],
}


async def run(args: tuple[str, ...], env: dict[str, str]) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "detfleet",
        *args,
        env=clean | {"DETFLEET_LOG_LEVEL": "WARNING"} | env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    return process.returncode or 0, out.decode(), err.decode()


@pytest.mark.parametrize(
    ("args", "case"), [(args, case) for args, cases in COMMANDS.items() for case in sorted(cases)]
)
async def test_an_expected_failure_is_one_line_with_its_exit_code(args: tuple[str, ...], case: str) -> None:
    env, says = CASES[case]
    code, out, err = await run(args, env)
    assert code == EXIT_CODES[case], err
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith(f"detfleet {args[0]}: error: ")
    assert says in line
    assert "guest:wrong" not in line, "passwords are masked"
