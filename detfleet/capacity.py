"""The capacity model: what a plant of N cameras at F frames per second needs, from costs measured here.

Every constant lives in this module, and both ``detfleet plan`` and docs/scaling.md (whose tables
:func:`docs_tables` renders; a unit test holds them equal) use it. MEASURED figures come from
``python -m bench.stage_costs`` (bench/results/stage_costs.json) and ``make bench`` on the reference
machine (2 cores of an AMD EPYC, RabbitMQ 3.10.8, Postgres 15, ONNX Runtime CPU, the shipped 320x320
detector); ASSUMED figures are not measurable on it (a GPU, a broker node's disk and network) and say so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCALING_DOC = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"

# ---- MEASURED on the reference machine, one core, per frame (bench/results/stage_costs.json) -------------

REFERENCE_MACHINE = "2 cores of an AMD EPYC, RabbitMQ 3.10.8, Postgres 15, ONNX Runtime 1.31 CPU"
# decode_frame (libjpeg at the reduced scale the model allows): a line through 320x240 and 640x480 frames
DECODE_MS_AT = ((17.6, 0.392), (58.7, 1.215))  # (JPEG KB, ms): 320x240 and 640x480 frames
LETTERBOX_MS = 0.389  # resize and pad into the 320x320 input tensor (640x480 frames, decoded at 1/2)
INFERENCE_MS_PER_IMAGE = {1: 4.474, 2: 4.793, 4: 4.278, 8: 4.232, 16: 4.656}  # one intra-op thread
# Everything else a replica spends per frame: aio-pika receive and ack, batching, the sink's client side,
# asyncio. From make bench (bench/results/bench.json, one run): 2 replicas at 201.65 frames/s kept 1.77 cores
# busy, 8.78 ms a frame, less that run's own inference (6.29 ms, batch 16, one thread), decode and letterbox.
# Plus the result event a replica publishes per row and waits to see confirmed (docs/results.md: 783 against
# 1,217 µs of replica CPU a frame without and with events, a fake detector, 2,000 frames, three runs each).
RESULT_EVENT_MS = 0.43
WORKER_OVERHEAD_MS = 0.9 + RESULT_EVENT_MS
# Broker CPU per message (persistent publish with confirm, delivery, ack): a line through the same sizes.
BROKER_MS_AT = ((17.6, 0.498), (58.7, 0.736))
SINK_MS_PER_ROW = 0.123  # the worker's batched upsert, statement wall time per row (16-row batches)
POSTGRES_CPU_MS_PER_ROW = 0.1  # Postgres cores busy / rows per second in make bench (0.02 at 201.65/s)

# ---- ASSUMED: not measurable here; each is a parameter of plan() -----------------------------------------

# The shipped 0.42 GFLOP model on one data-centre GPU (fp16, batch 16-64): a conservative figure for a
# model this small; bench/gpu.py measures the real one on a GPU machine.
GPU_IMAGES_PER_S = 2_000.0
BROKER_NODE_CORES = 8
BROKER_NODE_DISK_MB_S = 400.0  # sustained writes of persistent bodies on a node's SSD
BROKER_NODE_NET_MB_S = 1_000.0  # 10 GbE: bodies come in once and go out once
# One classic or quorum queue is one Erlang process, so it uses one core at most: a lane's ceiling. Of a
# message's broker CPU the queue process does a share (enqueue, index, delivery, ack); the channel and
# connection processes do the framing and routing on other cores.
QUEUE_CORES = 1.0
QUEUE_SHARE_OF_MESSAGE_CPU = 0.4
# A replica beside a GPU decodes on this many cores (DETFLEET_DECODE_THREADS=4), so one node carries it.
GPU_REPLICA_CORES = 4
POSTGRES_NODE_CORES = 8
HEADROOM = 0.7  # plan for 70% busy: bursts, a replica or node lost, the backlog after an outage
CLAIM_CHECK_KB = 256.0  # past this a frame should go to object storage and the message carry its key
CLAIM_CHECK_MESSAGE_KB = 1.0  # what such a message still weighs: headers and the object's key
DEFAULT_FRAME_KB = 60.0  # a 640x480 JPEG q90 frame of the bench


def _line(points: tuple[tuple[float, float], ...], x: float) -> float:
    (x0, y0), (x1, y1) = points
    slope = (y1 - y0) / (x1 - x0)
    return max(0.0, y0 + slope * (x - x0))


def decode_ms(frame_kb: float) -> float:
    """CPU ms to decode a JPEG of ``frame_kb`` (cost grows with the pixels, and so with the bytes)."""
    return _line(DECODE_MS_AT, frame_kb)


def broker_ms(frame_kb: float) -> float:
    """Broker CPU ms per message of ``frame_kb``: publish, confirm, deliver, ack."""
    return _line(BROKER_MS_AT, frame_kb)


def best_batch() -> int:
    return min(INFERENCE_MS_PER_IMAGE, key=lambda b: INFERENCE_MS_PER_IMAGE[b])


class PlanError(ValueError):
    """A plan cannot be made from these inputs (the message says which)."""


@dataclass(frozen=True)
class Plan:
    cameras: int
    fps: float
    frame_kb: float
    frames_per_s: float
    ingress_mb_s: float
    claim_check: bool  # frames go to object storage, messages carry their key
    message_kb: float
    cpu_ms_per_frame: dict[str, float]
    replicas_cpu: int  # CPU only: one replica a core, one ONNX Runtime thread each
    cores_cpu: int
    gpus: int  # with GPUs: inference there, decode and the rest still on CPU cores
    cores_with_gpus: int
    replicas_with_gpus: int
    broker_cores: float
    broker_nodes: int
    bulk_queues: int  # queues (shards) the bulk lane needs: one queue is about one core
    postgres_cores: float
    knees_cpu: str  # the units a growing plant fills, in order, with the frames/s each carries
    knees_gpu: str
    notes: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _units(load: float, capacity: float) -> int:
    return max(1, math.ceil(load / (capacity * HEADROOM)))


def plan(
    cameras: int,
    fps: float,
    frame_kb: float = DEFAULT_FRAME_KB,
    gpu_images_per_s: float = GPU_IMAGES_PER_S,
) -> Plan:
    """The model's answer for ``cameras`` cameras at ``fps`` frames a second each, of ``frame_kb`` each."""
    if cameras < 1:
        raise PlanError(f"--cameras must be at least 1, got {cameras}")
    if not 0 < fps <= 1_000:
        raise PlanError(f"--fps must be above 0 and at most 1000, got {fps:g}")
    if not 0.5 <= frame_kb <= 100_000:
        raise PlanError(f"--frame-kb must be between 0.5 and 100000, got {frame_kb:g}")
    rate = cameras * fps
    claim_check = frame_kb > CLAIM_CHECK_KB
    message_kb = CLAIM_CHECK_MESSAGE_KB if claim_check else frame_kb
    inference = INFERENCE_MS_PER_IMAGE[best_batch()]
    stages = {
        "decode": round(decode_ms(frame_kb), 3),
        "letterbox": LETTERBOX_MS,
        "inference": inference,
        "worker_overhead": WORKER_OVERHEAD_MS,
        "broker": round(broker_ms(message_kb), 3),
        "postgres": POSTGRES_CPU_MS_PER_ROW,
    }
    host_ms = stages["decode"] + LETTERBOX_MS + WORKER_OVERHEAD_MS
    cores_cpu = _units(rate * (host_ms + inference) / 1000, 1.0)
    gpus = _units(rate, gpu_images_per_s)
    cores_gpu = _units(rate * host_ms / 1000, 1.0)
    broker_cores = rate * stages["broker"] / 1000
    mb_s = rate * message_kb / 1000
    broker_nodes = max(
        _units(broker_cores, BROKER_NODE_CORES),
        _units(mb_s, BROKER_NODE_DISK_MB_S),
        _units(2 * mb_s, BROKER_NODE_NET_MB_S),
    )
    postgres_cores = rate * POSTGRES_CPU_MS_PER_ROW / 1000
    return Plan(
        cameras=cameras,
        fps=fps,
        frame_kb=frame_kb,
        frames_per_s=round(rate, 1),
        ingress_mb_s=round(rate * frame_kb / 1000, 1),
        claim_check=claim_check,
        message_kb=message_kb,
        cpu_ms_per_frame=stages,
        replicas_cpu=cores_cpu,
        cores_cpu=cores_cpu,
        gpus=gpus,
        cores_with_gpus=cores_gpu,
        replicas_with_gpus=max(gpus, math.ceil(cores_gpu / GPU_REPLICA_CORES)),
        broker_cores=round(broker_cores, 2),
        broker_nodes=broker_nodes,
        bulk_queues=_units(broker_cores * QUEUE_SHARE_OF_MESSAGE_CPU, QUEUE_CORES),
        postgres_cores=round(postgres_cores, 2),
        knees_cpu=_knees(frame_kb, gpu=False, gpu_images_per_s=gpu_images_per_s),
        knees_gpu=_knees(frame_kb, gpu=True, gpu_images_per_s=gpu_images_per_s),
        notes=_notes(rate, frame_kb, claim_check, broker_nodes),
    )


def unit_limits(frame_kb: float, gpu_images_per_s: float = GPU_IMAGES_PER_S) -> dict[str, float]:
    """Frames per second one unit of each resource carries at HEADROOM: the curve's knees."""
    message_kb = CLAIM_CHECK_MESSAGE_KB if frame_kb > CLAIM_CHECK_KB else frame_kb
    host_ms = decode_ms(frame_kb) + LETTERBOX_MS + WORKER_OVERHEAD_MS
    per_message = broker_ms(message_kb)
    return {
        "one core, CPU inference": 1000 * HEADROOM / (host_ms + INFERENCE_MS_PER_IMAGE[best_batch()]),
        "one core, decode and the rest (GPU inference)": 1000 * HEADROOM / host_ms,
        "one GPU": gpu_images_per_s * HEADROOM,
        "one queue (one Erlang process)": 1000
        * QUEUE_CORES
        * HEADROOM
        / (QUEUE_SHARE_OF_MESSAGE_CPU * per_message),
        "one broker node": min(
            1000 * BROKER_NODE_CORES * HEADROOM / per_message,
            1000 * BROKER_NODE_DISK_MB_S * HEADROOM / message_kb,
            1000 * BROKER_NODE_NET_MB_S * HEADROOM / (2 * message_kb),
        ),
        "one Postgres node": 1000 * POSTGRES_NODE_CORES * HEADROOM / max(POSTGRES_CPU_MS_PER_ROW, 1e-6),
    }


def bottlenecks(
    frame_kb: float, gpu: bool, gpu_images_per_s: float = GPU_IMAGES_PER_S
) -> list[tuple[str, float]]:
    """The knees in the order a growing plant meets them: each unit and the frames/s it carries. Cores and
    GPUs are added replica by replica; a queue, a broker node and Postgres are shared and need a change
    of layout (more queues, nodes, clusters) when passed."""
    limits = unit_limits(frame_kb, gpu_images_per_s)
    if gpu:
        node = f"{GPU_REPLICA_CORES} decoding cores beside a GPU"
        limits[node] = GPU_REPLICA_CORES * limits["one core, decode and the rest (GPU inference)"]
        names = [node, "one GPU"]
    else:
        names = ["one core, CPU inference"]
    names += ["one queue (one Erlang process)", "one broker node", "one Postgres node"]
    return sorted(((name, limits[name]) for name in names), key=lambda item: item[1])


def _knees(frame_kb: float, gpu: bool, gpu_images_per_s: float) -> str:
    return " -> ".join(f"{name} ({fps:,.0f}/s)" for name, fps in bottlenecks(frame_kb, gpu, gpu_images_per_s))


def _notes(rate: float, frame_kb: float, claim_check: bool, broker_nodes: int) -> tuple[str, ...]:
    notes = []
    if claim_check:
        notes.append(
            f"frames over {CLAIM_CHECK_KB:g} KB: claim-check them (body to object storage, the message"
            f" carries its key); the broker then carries about {CLAIM_CHECK_MESSAGE_KB:g} KB a frame"
        )
    elif rate * frame_kb / 1000 > BROKER_NODE_DISK_MB_S * HEADROOM:
        notes.append("the bodies pass one broker node's disk: claim-check them, or spread the lanes' queues")
    if broker_nodes > 3:
        notes.append(
            f"{broker_nodes} broker nodes: past one cluster's comfort; split the plant by site into several"
            " clusters, each site's gateways publishing to their own (docs/scaling.md)"
        )
    return tuple(notes)


# ---- what docs/scaling.md shows (a unit test holds the page equal to this) -----------------------------

EXAMPLES = ((10, 5.0), (100, 5.0), (1_000, 5.0), (1_000, 25.0), (10_000, 5.0))


def stage_table() -> list[str]:
    lines = ["| Stage | CPU ms a frame (one core) |", "|---|---:|"]
    for kb in (17.6, 58.7):
        lines.append(f"| JPEG decode, {kb:g} KB frame | {decode_ms(kb):.3f} |")
    lines.append(f"| letterbox into 320x320 | {LETTERBOX_MS:.3f} |")
    for batch, ms in INFERENCE_MS_PER_IMAGE.items():
        lines.append(f"| inference, batch {batch} (per image) | {ms:.3f} |")
    overhead = "worker overhead (AMQP client, acks, batching, sink client, result event)"
    lines.append(f"| {overhead} | {WORKER_OVERHEAD_MS:.3f} |")
    for kb in (1.0, 17.6, 58.7):
        lines.append(f"| broker, {kb:g} KB message (publish, confirm, deliver, ack) | {broker_ms(kb):.3f} |")
    lines.append(f"| sink: batched upsert, per row (statement wall time) | {SINK_MS_PER_ROW:.3f} |")
    lines.append(f"| Postgres CPU per row | {POSTGRES_CPU_MS_PER_ROW:.3f} |")
    return lines


def limits_table() -> list[str]:
    lines = ["| One unit of | 17 KB frames/s | 60 KB frames/s | 500 KB frames/s (claim-check) |"]
    lines.append("|---|---:|---:|---:|")
    columns = [unit_limits(kb) for kb in (17.6, 58.7, 500.0)]
    for name in columns[0]:
        lines.append(f"| {name} | " + " | ".join(f"{c[name]:,.0f}" for c in columns) + " |")
    return lines


def plan_table() -> list[str]:
    lines = [
        "| Cameras x fps | frames/s | MB/s in | CPU only: replicas (= cores) | GPUs | cores beside GPUs"
        " | broker cores | broker nodes | bulk queues | Postgres cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cameras, fps in EXAMPLES:
        p = plan(cameras, fps)
        lines.append(
            f"| {cameras:,} x {fps:g} | {p.frames_per_s:,.0f} | {p.ingress_mb_s:,.1f} | {p.replicas_cpu:,}"
            f" | {p.gpus:,} | {p.cores_with_gpus:,} | {p.broker_cores:,.1f} | {p.broker_nodes:,}"
            f" | {p.bulk_queues:,} | {p.postgres_cores:,.1f} |"
        )
    return lines


def docs_tables() -> dict[str, list[str]]:
    """The generated blocks of docs/scaling.md, by marker name."""
    return {"stages": stage_table(), "limits": limits_table(), "plans": plan_table()}


def render(p: Plan) -> str:
    """What ``detfleet plan`` prints."""
    stages = ", ".join(f"{k} {v:g}" for k, v in p.cpu_ms_per_frame.items())
    lines = [
        f"{p.cameras:,} cameras x {p.fps:g} fps = {p.frames_per_s:,.0f} frames/s of {p.frame_kb:g} KB"
        f" ({p.ingress_mb_s:,.1f} MB/s in)",
        f"CPU ms a frame: {stages}",
        f"CPU only:   {p.replicas_cpu:,} replicas on {p.cores_cpu:,} cores (one replica a core, one ONNX"
        " Runtime thread each)",
        f"With GPUs:  {p.gpus:,} GPUs, {p.cores_with_gpus:,} cores for decoding and the rest,"
        f" {p.replicas_with_gpus:,} replicas",
        f"Broker:     {p.broker_cores:,.1f} cores, {p.broker_nodes:,} nodes, {p.bulk_queues:,} bulk queue(s)"
        + (f"; messages of {p.message_kb:g} KB (claim-check)" if p.claim_check else ""),
        f"Postgres:   {p.postgres_cores:,.1f} cores",
        f"Knees as cameras grow, CPU only: {p.knees_cpu}",
        f"Knees as cameras grow, with GPUs: {p.knees_gpu}",
        f"(at {HEADROOM:.0%} busy; measured on {REFERENCE_MACHINE}; docs/scaling.md)",
    ]
    lines += [f"Note: {note}" for note in p.notes]
    return "\n".join(lines)


def _replacement(block: str) -> Callable[[re.Match[str]], str]:
    return lambda match: match.group(1) + block + match.group(2)


def write_docs(path: Path = SCALING_DOC) -> None:
    """Rewrite the generated blocks of docs/scaling.md (between <!-- capacity:NAME --> markers)."""
    text = path.read_text()
    for name, lines in docs_tables().items():
        pattern = re.compile(rf"(<!-- capacity:{name} -->\n).*?(\n<!-- /capacity:{name} -->)", re.DOTALL)
        text, found = pattern.subn(_replacement("\n".join(lines)), text)
        if not found:
            raise SystemExit(f"{path}: no <!-- capacity:{name} --> block")
    path.write_text(text)


if __name__ == "__main__":
    write_docs()
