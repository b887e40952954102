"""The audit trail of ``detfleet dlq``: one JSON line per replay or purge, appended, never rewritten.

Who (the login name), where (host), when (UTC), what (action, filter) and how many. A line is written once
the action ends, interrupted or not, so it tells what really happened.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.errors import DetfleetError


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (some containers)
        return str(os.getuid())


def ensure_writable(path: Path) -> None:
    """Fail before acting, not after, when the audit log cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as error:
        raise DetfleetError(f"cannot append to the audit log {path}: {error.strerror or error}") from None


def append(path: Path, action: str, filters: dict[str, Any], **counts: Any) -> dict[str, Any]:
    line = {
        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "who": _who(),
        "host": socket.gethostname(),
        "action": action,
        "filter": filters,
        **counts,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(line, sort_keys=True) + "\n")
    except OSError as error:
        raise DetfleetError(f"cannot append to the audit log {path}: {error.strerror or error}") from None
    return line
