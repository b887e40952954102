"""The console script: usage errors and bad settings exit 2 with one line on stderr; --version; text logs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("DETFLEET_")}
    return subprocess.run(
        [sys.executable, "-m", "detfleet", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [("DETFLEET_REALTIME_TTL_MS", "soon"), ("DETFLEET_QUEUE_TYPE", "stream"), ("DETFLEET_TYPO_HERE", "1")],
)
def test_bad_settings_stop_start_up_naming_the_variable(variable: str, value: str) -> None:
    result = run_cli("topology", "definitions", **{variable: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("produce", "consume", "topology", "db", "dlq"):
        assert command in result.stdout


def test_an_unknown_command_is_refused() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "unknown command" in result.stderr


def test_definitions_print_without_a_broker() -> None:
    result = run_cli("topology", "definitions")
    assert result.returncode == 0, result.stderr
    assert '"detfleet.frames"' in result.stdout


def test_version_names_the_package_version() -> None:
    from importlib.metadata import version

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"detfleet {version('detfleet')}"


def test_no_command_is_a_usage_error_on_stderr() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: detfleet" in result.stderr


@pytest.mark.parametrize(
    "args",
    [("dlq", "purge", "--all"), ("dlq", "replay"), ("dlq", "list", "--since", "soon"), ("db", "prune")],
)
def test_bad_arguments_are_usage_errors(args: tuple[str, ...]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


def test_logs_are_text_unless_json_is_asked_for() -> None:
    from shared.logs import wants_json

    assert wants_json(True) is True
    assert wants_json(False) is False
    # Under pytest stderr is not a terminal: unset means JSON for a collector.
    assert wants_json(None) is not sys.stderr.isatty()
