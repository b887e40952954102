"""Logging: JSON lines for collectors, text on a terminal; context variables carry ``task_id``, ``trace_id``.

Set the ids once per message with :func:`task_context`; every log line inside carries them, so one
trace id can be followed from the producer's log, through the consumer's, to the result row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

_task_id: ContextVar[str | None] = ContextVar("task_id", default=None)
_trace_id: ContextVar[str | None] = ContextVar("trace_id", default=None)
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


@contextlib.contextmanager
def task_context(task_id: str | None, trace_id: str | None) -> Iterator[None]:
    tokens = (_task_id.set(task_id), _trace_id.set(trace_id))
    try:
        yield
    finally:
        _task_id.reset(tokens[0])
        _trace_id.reset(tokens[1])


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, event, task_id, trace_id, then any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            "task_id": getattr(record, "task_id", None) or _task_id.get(),
            "trace_id": getattr(record, "trace_id", None) or _trace_id.get(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _RESERVED and k not in line})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def wants_json(json_lines: bool | None) -> bool:
    """An explicit setting wins; unset, a person at a terminal reads text and a log collector gets JSON."""
    return not sys.stderr.isatty() if json_lines is None else json_lines


def configure_logging(level: str = "INFO", json_lines: bool | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if wants_json(json_lines):
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter at INFO (every reconnect attempt) drowns our own events.
    for noisy in ("aiormq", "aio_pika", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # aiormq logs a failed connect as an ERROR of its own; our error, raised to the caller, already says it.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
