"""What happened to one message, as a type, and the one function that decides what to do about it.

Every message ends in exactly one :data:`Outcome`; :func:`decide` maps it, with what the sink already
holds for its task id, to an :class:`Action` (which row to write, whether to dead-letter, retry or requeue,
and whether to ack). Nothing else in the consumer chooses between ack, retry, dead-letter and requeue;
:mod:`consumer.settle` carries the action out (docs/message-flow.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, assert_never

from consumer.detector.base import Detection
from shared.schema import Task

Status = Literal["ok", "failed", "shed"]


@dataclass(frozen=True)
class Ok:
    detections: tuple[Detection, ...]
    width: int
    height: int


@dataclass(frozen=True)
class BadInput:
    """Off the wire contract or not a usable image: never retried."""

    reason: str


@dataclass(frozen=True)
class Transient:
    """Might work next time (an inference error): retried with a delay, up to the limit."""

    reason: str


@dataclass(frozen=True)
class OutOfMemory:
    """Inference ran out of memory even for this image alone: retried like a transient failure."""

    reason: str


@dataclass(frozen=True)
class Crashed:
    """Earlier deliveries of this task started and never finished: the consumer died with it in hand."""

    times: int


@dataclass(frozen=True)
class SinkUnavailable:
    """Postgres did not take the row: requeued, no attempt burned."""

    reason: str


@dataclass(frozen=True)
class PastDeadline:
    """The task's deadline passed before its batch started."""


@dataclass(frozen=True)
class DroppedByBroker:
    """The broker expired the message or pushed it out of a full lane (read from the intake)."""

    reason: str


Outcome = Ok | BadInput | Transient | OutOfMemory | Crashed | SinkUnavailable | PastDeadline | DroppedByBroker


@dataclass(frozen=True)
class Stored:
    """What the sink holds for a task id before this delivery is settled."""

    status: Status
    reason: str | None
    dead_lettered: bool  # a DLQ copy of the task was confirmed (and not replayed or purged since)


@dataclass(frozen=True)
class Action:
    """What settling one message does, in order: write ``row``, publish ``dead_letter`` or ``retry``, then
    ack (or requeue instead of all of it)."""

    status: Status | None = None
    reason: str | None = None
    dead_letter: bool = False
    retry: Task | None = None
    requeue: bool = False
    kind: str = field(default="ok")


def decide(outcome: Outcome, task: Task | None, max_retries: int, stored: Stored | None = None) -> Action:
    """The one place where a message's fate is decided (docs/message-flow.md, the settle table).

    ``stored`` keeps the promise that every failed row has exactly one DLQ entry: a task whose row already
    says failed gets its copy if none was confirmed yet, whatever this delivery found, and never a second.
    """
    action = _by_outcome(outcome, task, max_retries)
    if stored is None or stored.status != "failed" or action.requeue or action.status == "ok":
        return action
    if stored.dead_lettered:
        # The row keeps its failure; the sink counts this delivery as a redelivery. No second copy.
        return Action(status="failed", reason=stored.reason, kind="already_dead_lettered")
    return Action(status="failed", reason=stored.reason or action.reason, dead_letter=True, kind=action.kind)


def _by_outcome(outcome: Outcome, task: Task | None, max_retries: int) -> Action:
    match outcome:
        case Ok():
            return Action(status="ok", kind="ok")
        case BadInput(reason):
            return Action(status="failed", reason=reason, dead_letter=True, kind="bad_input")
        case Transient(reason):
            return _retry_or_give_up(reason, task, max_retries, "transient_exhausted")
        case OutOfMemory(reason):
            return _retry_or_give_up(reason, task, max_retries, "out_of_memory")
        case Crashed(times):
            reason = f"crashed the consumer {times} times"
            return Action(status="failed", reason=reason, dead_letter=True, kind="crashed")
        case SinkUnavailable(reason):
            return Action(requeue=True, reason=reason, kind="sink_unavailable")
        case PastDeadline():
            if task is not None and task.lane == "realtime":
                return Action(status="shed", reason="deadline exceeded", kind="shed")
            return Action(
                status="failed", reason="deadline exceeded", dead_letter=True, kind="deadline_exceeded"
            )
        case DroppedByBroker(reason):
            if task is not None and task.lane == "realtime":
                return Action(status="shed", reason=reason, kind="shed")
            return Action(status="failed", reason=reason, dead_letter=True, kind="dropped_by_broker")
    assert_never(outcome)


def _retry_or_give_up(reason: str, task: Task | None, max_retries: int, kind: str) -> Action:
    if task is not None and task.attempt <= max_retries:
        return Action(retry=task.next_attempt(), reason=reason, kind="retry")
    attempts = task.attempt if task else 1
    return Action(
        status="failed", reason=f"{reason} (gave up after {attempts} attempts)", dead_letter=True, kind=kind
    )
