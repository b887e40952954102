"""``make bench-scale`` (``python -m bench.run --scale``): how detfleet's cost grows with the work, on the
shipped model, every figure of a table measured in the same run (the machine is shared: compare ratios).

- backlog depth: a bulk backlog of each depth is published first, then the broker's memory and the disk
  it took are read, then the replicas drain a fixed sample of it; the rate is the steady one (rows between
  the 20th and the 95th percentile of completion times, so start-up and the tail do not count), the RSS
  the replicas' peak. Each depth runs with the bulk lane's shipped storage policy and, for the before
  figures, with the same policy less its storage keys (RabbitMQ 3.10's default classic queue mode);
- cameras: the same frames from one camera and from 1,000 distinct cameras (routing keys);
- replicas: 1, 2, 4 and 8 replicas on this machine's cores, with one ONNX Runtime thread each and with
  ONNX Runtime's own choice (one a core), each replica's peak RSS and what its prefetch holds;
- lane isolation: realtime frames published at a modest rate, end to end publish to row, with the bulk
  lane empty and with a deep bulk backlog being drained at the same time.

Frames are the bench's synthetic scenes at 320x240 (about 17 KB): a 200,000-frame backlog is then ~3.4 GB,
which fits this machine's disk and, in the default mode, its broker's memory too.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import BenchEnv, ResourceSampler, latency_summary, percentile, ratio
from bench.peers.runners import DetfleetPeer, stop
from bench.publishing import publish
from shared import db
from shared.management import Management
from shared.topology import QUEUE_BULK, PolicySpec, Topology

CORES = os.cpu_count() or 1
SCALE_FRAME_SIZE = (320, 240)
BEST_BATCH = 16  # the shipped model's best max batch in make bench (docs/performance.md)
STORAGE_KEYS = ("queue-mode", "queue-version")
STEADY_FROM, STEADY_TO = 0.20, 0.95
POLL_S = 0.2
ROWS_TIMEOUT_S = 900.0
STATS_WAIT_S = 30.0


@dataclass(frozen=True)
class ScalePlan:
    depths: tuple[int, ...] = (1_000, 20_000, 200_000)
    sample: int = 1_500  # frames drained and timed at each depth (all of a shallower backlog)
    storages: tuple[str, ...] = ("shipped", "default")
    cameras: tuple[int, ...] = (1, 1_000)
    camera_frames: int = 2_000
    replicas: tuple[int, ...] = (1, 2, 4, 8)
    replica_threads: tuple[int, ...] = (1, 0)
    replica_frames: int = 1_500
    realtime_rate: float = 10.0
    realtime_frames: int = 200
    lane_backlog: int = 20_000
    # (max batch, batches in flight) of the replicas in the lane isolation runs
    lane_settings: tuple[tuple[int, int], ...] = ((16, 2), (8, 2), (4, 2), (4, 1))

    @classmethod
    def choose(cls, quick: bool, deepest: int | None = None) -> ScalePlan:
        if quick:
            return cls(
                depths=(500, 2_000),
                sample=400,
                storages=("shipped",),
                camera_frames=500,
                replicas=(1, 2),
                replica_threads=(1,),
                replica_frames=400,
                realtime_frames=60,
                lane_backlog=2_000,
                lane_settings=((16, 2),),
            )
        if deepest is not None:
            return cls(depths=(1_000, 20_000, deepest))
        return cls()


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] scale: {message}", flush=True)


# ---- pure figures ---------------------------------------------------------------------------------------


def steady_rate(completed: Sequence[datetime]) -> float | None:
    """Rows per second between the STEADY_FROM and STEADY_TO quantiles of completion times: start-up
    (replicas loading at different moments) and the drain's tail are left out."""
    times = sorted(completed)
    if len(times) < 10:
        return None
    first, last = int(len(times) * STEADY_FROM), int(len(times) * STEADY_TO) - 1
    wall = (times[last] - times[first]).total_seconds()
    return round((last - first) / wall, 2) if wall > 0 else None


def within(value: float | None, reference: float | None, tolerance: float) -> bool | None:
    """Whether ``value`` is at least (1 - tolerance) of ``reference``; None where either is missing."""
    if value is None or reference is None:
        return None
    return value >= (1 - tolerance) * reference


def storage_policy(storage: str) -> PolicySpec:
    """The bulk lane's policy as shipped, or with 3.10's default classic mode instead of its storage keys
    (said explicitly: a policy without the key leaves a lazy queue lazy)."""
    shipped = next(p for p in Topology.from_settings().policies if p.queue == QUEUE_BULK)
    if storage == "shipped":
        return shipped
    definition = {k: v for k, v in shipped.definition.items() if k not in STORAGE_KEYS}
    return PolicySpec(shipped.name, shipped.queue, {**definition, "queue-mode": "default"})


# ---- the broker's side -------------------------------------------------------------------------------


async def broker_figures(env: BenchEnv, expected: int | None = None) -> dict[str, Any]:
    """The bulk queue's depth and memory, the node's memory and free disk (management API); with
    ``expected``, once its statistics (emitted every few seconds) show that many messages, or a bound."""
    async with Management(env.management_url) as api:
        deadline = time.monotonic() + STATS_WAIT_S
        while True:
            queue = await api.queue(env.name, QUEUE_BULK)
            if expected is None or queue.get("messages") == expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S * 5)
        nodes = await api.request("GET", "/nodes")
    node = nodes[0]
    status = queue.get("backing_queue_status") or {}
    return {
        "messages": queue.get("messages"),
        "queue_memory_mib": _mib(queue.get("memory")),
        "message_bytes_ram_mib": _mib(queue.get("message_bytes_ram")),
        "message_bytes_persistent_mib": _mib(queue.get("message_bytes_persistent")),
        "mode": status.get("mode"),
        "version": status.get("version"),
        "node_memory_mib": _mib(node.get("mem_used")),
        "node_memory_limit_mib": _mib(node.get("mem_limit")),
        "disk_free_mib": _mib(node.get("disk_free")),
    }


def _mib(value: Any) -> float | None:
    return None if value is None else round(float(value) / 2**20, 1)


async def purge_bulk(env: BenchEnv) -> None:
    async with Management(env.management_url) as api:
        await api.request("DELETE", f"/queues/{env.name}/{QUEUE_BULK}/contents")


async def set_storage(env: BenchEnv, storage: str) -> None:
    """Re-apply the bulk policy (a classic queue changes mode in place when its policy does)."""
    async with Management(env.management_url) as api:
        await api.set_policy(env.name, storage_policy(storage))


# ---- rows by lane ----------------------------------------------------------------------------------------


async def lane_rows(env: BenchEnv, lane: str | None = None) -> list[dict[str, Any]]:
    conn = await db.connect(env.database_url)
    try:
        query = "SELECT lane, captured_at, received_at, completed_at FROM detfleet_results"
        records = await (conn.fetch(query + " WHERE lane = $1", lane) if lane else conn.fetch(query))
    finally:
        await conn.close()
    return [dict(r) for r in records]


async def wait_lane_rows(env: BenchEnv, count: int, lane: str | None, alive: Any) -> None:
    """Poll until ``count`` rows (of ``lane``) are in; a generous bound catches a hang or a dead worker."""
    conn = await db.connect(env.database_url)
    query = "SELECT count(*) FROM detfleet_results" + (" WHERE lane = $1" if lane else "")
    try:
        deadline = time.monotonic() + ROWS_TIMEOUT_S
        while True:
            got = int(await (conn.fetchval(query, lane) if lane else conn.fetchval(query)))
            if got >= count:
                return
            if time.monotonic() > deadline or not alive():
                raise RuntimeError(f"only {got} of {count} {lane or ''} rows arrived")
            await asyncio.sleep(POLL_S)
    finally:
        await conn.close()


# ---- one drain -------------------------------------------------------------------------------------------


async def drain(
    env: BenchEnv,
    peer: DetfleetPeer,
    model: Path,
    bodies: Sequence[bytes],
    backlog: int,
    sample: int,
    logs: Path,
    cameras: int = 1,
) -> dict[str, Any]:
    """Publish ``backlog`` bulk frames, read the broker, let ``peer`` drain ``sample`` of them, purge."""
    await env.reset_rows()
    before = await broker_figures(env, expected=0)
    started = time.monotonic()
    publish_rate = await publish(env.amqp_url, bodies, backlog, cameras=cameras)
    after = await broker_figures(env, expected=backlog)
    processes = peer.start(env, model, logs)
    alive = lambda: all(p.poll() is None for p in processes)  # noqa: E731
    try:
        with ResourceSampler(lambda: [p.pid for p in processes]) as sampler:
            await wait_lane_rows(env, min(sample, backlog), None, alive)
    finally:
        await stop(processes)
    rows = await lane_rows(env)
    await purge_bulk(env)
    disk = None
    if before["disk_free_mib"] is not None and after["disk_free_mib"] is not None:
        disk = round(before["disk_free_mib"] - after["disk_free_mib"], 1)
    return {
        "backlog": backlog,
        "sample": len(rows),
        "publish_per_s": round(publish_rate, 1),
        "publish_s": round(time.monotonic() - started, 1),
        "tasks_per_s": steady_rate([r["completed_at"] for r in rows]),
        "broker": after,
        "broker_memory_growth_mib": _growth(before, after, "node_memory_mib"),
        "disk_used_mib": disk,
        **sampler.figures(),
    }


def _growth(before: dict[str, Any], after: dict[str, Any], key: str) -> float | None:
    if before.get(key) is None or after.get(key) is None:
        return None
    return round(float(after[key]) - float(before[key]), 1)


def best_peer(replicas: int = 2, threads: int = 1) -> DetfleetPeer:
    return DetfleetPeer(replicas, BEST_BATCH, intra_op_threads=threads)


# ---- the four curves -------------------------------------------------------------------------------------


async def backlog_depths(
    env: BenchEnv, model: Path, bodies: Sequence[bytes], plan: ScalePlan, logs: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for storage in plan.storages:
        await set_storage(env, storage)
        runs = []
        for depth in plan.depths:
            log(f"backlog {depth} ({storage} storage)")
            runs.append(await drain(env, best_peer(), model, bodies, depth, plan.sample, logs))
        shallow, deep = runs[0]["tasks_per_s"], runs[-1]["tasks_per_s"]
        out[storage] = {
            "runs": runs,
            "deepest_over_shallowest": ratio(deep, shallow),
            "met": within(deep, shallow, 0.10),
        }
    await set_storage(env, "shipped")
    return out


async def camera_counts(
    env: BenchEnv, model: Path, bodies: Sequence[bytes], plan: ScalePlan, logs: Path
) -> dict[str, Any]:
    runs = []
    for cameras in plan.cameras:
        log(f"{cameras} camera(s)")
        frames = plan.camera_frames
        run = await drain(env, best_peer(), model, bodies, frames, frames, logs, cameras)
        runs.append({"cameras": cameras, **run})
    one, many = runs[0]["tasks_per_s"], runs[-1]["tasks_per_s"]
    return {"runs": runs, "many_over_one": ratio(many, one), "met": within(many, one, 0.05)}


async def replica_counts(
    env: BenchEnv, model: Path, bodies: Sequence[bytes], plan: ScalePlan, logs: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    frame_bytes = sum(map(len, bodies)) / len(bodies)
    for threads in plan.replica_threads:
        runs = []
        for replicas in plan.replicas:
            log(f"{replicas} replica(s), {threads} intra-op threads")
            peer = best_peer(replicas, threads)
            run = await drain(env, peer, model, bodies, plan.replica_frames, plan.replica_frames, logs)
            prefetch = BEST_BATCH * 3  # bulk prefetch: max_batch x (batches_in_flight + 1)
            held = round(prefetch * frame_bytes / 2**20, 1)
            per_replica = run["peak_rss_mib_sum"] / replicas if run["peak_rss_mib_sum"] else None
            runs.append(
                {
                    "replicas": replicas,
                    "rss_mib_per_replica": None if per_replica is None else round(per_replica, 1),
                    "prefetch": prefetch,
                    "prefetch_bodies_mib": held,
                    **run,
                }
            )
        best = max(r["tasks_per_s"] or 0.0 for r in runs)
        most = runs[-1]["tasks_per_s"]
        out[str(threads)] = {
            "runs": runs,
            "most_over_best": ratio(most, best),
            # "must not collapse": the most replicas keep at least 80% of the best count's rate
            "met": within(most, best, 0.20),
        }
    return out


async def lane_isolation(
    env: BenchEnv,
    model: Path,
    bodies: Sequence[bytes],
    plan: ScalePlan,
    logs: Path,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """Realtime latency idle and behind a bulk backlog at each (max batch, batches in flight); ``cwd``:
    another tree's detfleet (the before figures of a change)."""
    out: dict[str, Any] = {}
    for batch, in_flight in plan.lane_settings:
        point: dict[str, Any] = {"max_batch": batch, "batches_in_flight": in_flight}
        for backlog in (0, plan.lane_backlog):
            log(f"realtime at {plan.realtime_rate}/s, max batch {batch}, {backlog} bulk frames waiting")
            key = "idle" if backlog == 0 else "backlog"
            peer = DetfleetPeer(2, batch, intra_op_threads=1, cwd=cwd, batches_in_flight=in_flight)
            point[key] = await _realtime_run(env, model, bodies, plan, logs, backlog, peer)
        idle, loaded = point["idle"]["latency_ms"]["p99"], point["backlog"]["latency_ms"]["p99"]
        point["backlog_p99_over_idle_p99"] = ratio(loaded, idle)
        point["met"] = None if idle is None or loaded is None else loaded <= 2 * idle
        out[f"{batch}/{in_flight}"] = point
    return out


async def _realtime_run(
    env: BenchEnv,
    model: Path,
    bodies: Sequence[bytes],
    plan: ScalePlan,
    logs: Path,
    backlog: int,
    peer: DetfleetPeer,
) -> dict[str, Any]:
    await env.reset_rows()
    if backlog:
        await publish(env.amqp_url, bodies, backlog)
    processes = peer.start(env, model, logs)
    alive = lambda: all(p.poll() is None for p in processes)  # noqa: E731
    try:
        # warm: every replica has its model loaded and has finished batches before the realtime clock runs
        warm = 64 if not backlog else 0
        if warm:
            await publish(env.amqp_url, bodies, warm)
        await wait_lane_rows(env, max(warm, 2 * peer.max_batch * peer.replicas), "bulk", alive)
        bulk_before = len(await lane_rows(env, "bulk"))
        started = time.monotonic()
        await publish(env.amqp_url, bodies, plan.realtime_frames, rate=plan.realtime_rate, lane="realtime")
        await wait_lane_rows(env, plan.realtime_frames, "realtime", alive)
        wall = time.monotonic() - started
        bulk_during = len(await lane_rows(env, "bulk")) - bulk_before
        depth = (await broker_figures(env))["messages"]
    finally:
        await stop(processes)
    rows = await lane_rows(env, "realtime")
    await purge_bulk(env)
    latencies = [(r["completed_at"] - r["captured_at"]).total_seconds() * 1000 for r in rows]
    return {
        "bulk_backlog": backlog,
        "bulk_left_at_end": depth,
        "realtime_rate": plan.realtime_rate,
        "latency_ms": latency_summary(latencies),
        "p90_ms": None if not latencies else round(percentile(latencies, 90) or 0.0, 1),
        "bulk_per_s_meanwhile": round(bulk_during / wall, 1) if backlog else None,
    }


PARTS = ("lanes", "cameras", "replicas", "backlog")


async def run_scale(
    env: BenchEnv,
    model: Path,
    bodies: Sequence[bytes],
    plan: ScalePlan,
    logs: Path,
    parts: Sequence[str] = PARTS,
    baseline: Path | None = None,
) -> dict[str, Any]:
    """The parts asked for, in the order of the report; the bench's env, model and (small) frames. With
    ``baseline`` (a checkout of the code before a change), the lane isolation runs for it too."""
    started = time.monotonic()
    result: dict[str, Any] = {
        "frame_size": f"{SCALE_FRAME_SIZE[0]}x{SCALE_FRAME_SIZE[1]}",
        "frame_bytes_mean": round(sum(map(len, bodies)) / len(bodies)),
        "plan": {k: v for k, v in plan.__dict__.items()},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if "lanes" in parts:
        result["lanes"] = await lane_isolation(env, model, bodies, plan, logs)
        if baseline is not None:
            log(f"lane isolation again with the code of {baseline}")
            result["lanes_baseline"] = await lane_isolation(env, model, bodies, plan, logs, baseline)
    if "cameras" in parts:
        result["cameras"] = await camera_counts(env, model, bodies, plan, logs)
    if "replicas" in parts:
        result["replicas"] = await replica_counts(env, model, bodies, plan, logs)
    if "backlog" in parts:
        result["backlog"] = await backlog_depths(env, model, bodies, plan, logs)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.monotonic() - started, 1)
    return result
