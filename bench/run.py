"""``make bench``: detfleet against its ceilings and its peers, on one set of 640x480 JPEG frames.

For each model (the shipped default, and a compute-bound ~8 GFLOP random-weight graph):

1. ceiling: decode, preprocess, infer and a batched insert in one process, no broker (bench/ceiling.py);
2. broker ceiling: publish and consume the same bodies with aio-pika, no work;
3. Celery peer (bench/peers/celery_peer.py), Celery with celery-batches (bench/peers/celery_batches_peer.py)
   and 4. seed-style peer (bench/peers/seed_peer.py); the machine's limit: a process a core decoding and
   inferring from memory, nothing else (bench/ceiling.py);
5. detfleet: 1 and 2 ``detfleet consume`` replicas over a grid of max batch and ONNX Runtime intra-op
   threads (0 = ONNX Runtime's choice, one a core; 1), the best kept; the ceilings get the same grid;

then the latency of Celery, seed-style and detfleet at one common paced rate (half the slowest one's
maximum), and a latency sweep of detfleet's best setting at 25/50/75/100% of its maximum rate. Also the
producer CLI's confirmed publish rate against a bare aio-pika loop (bench/publish_rate.py) and the
prototypes of consumer changes (bench/prototypes.py). Everything runs in a throw-away vhost and database.

Writes bench/results/bench.json, then bench/report.py writes bench/results/bench.png and
docs/performance.md from it.

    .venv/bin/python -m bench.run            # full run, about 15-20 minutes on 2 cores
    .venv/bin/python -m bench.run --quick    # a few hundred frames, default model only: 2-3 minutes
    .venv/bin/python -m bench.run --profile  # also py-spy record a replica of detfleet's best setting
    .venv/bin/python -m bench.run --scale    # only the scale part (bench/scale.py): bench/results/scale.json
    .venv/bin/python -m bench.run --peers    # only the strongest peers and the machine's limit: peers.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import celery  # type: ignore[import-untyped]
import onnxruntime
import psutil

from bench import ceiling, prototypes, publish_rate, report, scale
from bench.common import BenchEnv, ModelSpec, compute_model, default_model, make_frames, ratio
from bench.peers.runners import (
    CeleryBatchesPeer,
    CeleryPeer,
    DetfleetPeer,
    Peer,
    SeedPeer,
    paced,
    saturated,
)
from shared.management import Management
from shared.settings import DEFAULT_DATABASE_URL, DEFAULT_MANAGEMENT_URL

RESULTS = Path(__file__).with_name("results")
CORES = os.cpu_count() or 1
SWEEP = (0.25, 0.5, 0.75, 1.0)
TARGET_OF_CEILING = 0.90
TARGET_OVER_CELERY = 3.0
TARGET_OF_RAW_ONNX = 0.95


@dataclass(frozen=True)
class Plan:
    """How much each part measures: the full run, or --quick for development."""

    models: tuple[str, ...]
    frames: dict[str, int]  # backlog per saturated run, per model
    batches: dict[str, tuple[int, ...]]  # detfleet and ceiling max-batch grid, per model
    threads: tuple[int, ...]  # ONNX Runtime intra-op threads grid: 0 lets it choose (one a core)
    replicas: tuple[int, ...]
    paced_seconds: float
    distinct_frames: int
    producer_frames: int
    producer_rounds: int
    raw_onnx_seconds: float

    @classmethod
    def choose(cls, quick: bool) -> Plan:
        if quick:
            return cls(
                ("default",), {"default": 300}, {"default": (8,)}, (0, 1), (1, 2), 6.0, 50, 500, 1, 2.0
            )
        return cls(
            ("default", "compute"),
            {"default": 1500, "compute": 160},
            {"default": (4, 8, 16), "compute": (2, 4, 8)},
            (0, 1),
            (1, 2),
            20.0,
            100,
            3000,
            3,
            5.0,
        )


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


# ---- one model --------------------------------------------------------------------------------------------


async def measure_model(
    env: BenchEnv, model: ModelSpec, bodies: Sequence[bytes], plan: Plan, logs: Path, profile: bool
) -> dict[str, Any]:
    count = plan.frames[model.key]
    grid = plan.batches[model.key]
    out: dict[str, Any] = {"model": {"description": model.description, "gflops": model.gflops}}
    out["model"]["file"] = model.path.name

    log(f"{model.key}: raw ONNX Runtime")
    out["raw_onnx"] = await asyncio.to_thread(
        ceiling.raw_onnx_grid, model.path, (1, *grid), plan.threads, plan.raw_onnx_seconds
    )

    runs = []
    for threads in plan.threads:
        for batch in grid:
            log(f"{model.key}: ceiling, batch {batch}, {threads} intra-op threads")
            runs.append(await ceiling.pipeline_ceiling(env, model.path, bodies, count, batch, threads))
    out["ceiling"] = {"runs": runs, "best": _best(runs)}

    log(f"{model.key}: broker ceiling")
    out["broker_ceiling"] = await ceiling.broker_ceiling(env, bodies, max(count, 1000))
    hint = out["ceiling"]["best"]["tasks_per_s"]

    log(f"{model.key}: Celery")
    out["celery"] = await saturated(env, CeleryPeer(CORES), model.path, bodies, count, logs, hint)
    log(f"{model.key}: seed-style")
    out["seed"] = await saturated(env, SeedPeer(CORES), model.path, bodies, count, logs, hint)
    log(f"{model.key}: Celery with celery-batches")
    out["celery_batches"] = await saturated(
        env, CeleryBatchesPeer(CORES), model.path, bodies, count, logs, hint
    )
    log(f"{model.key}: the machine's limit (a process a core, decode and inference only)")
    out["machine_limit"] = await asyncio.to_thread(
        ceiling.machine_limit, model.path, bodies, max(grid), plan.raw_onnx_seconds * 2
    )

    detfleet_runs = []
    for replicas in plan.replicas:
        for threads in plan.threads:
            for batch in grid:
                log(f"{model.key}: detfleet, {replicas} replica(s), max batch {batch}, {threads} threads")
                peer = DetfleetPeer(replicas, batch, intra_op_threads=threads)
                run = await saturated(env, peer, model.path, bodies, count, logs, hint)
                setting = {"replicas": replicas, "max_batch": batch, "intra_op_threads": threads}
                detfleet_runs.append({**setting, "max_wait_ms": peer.max_wait_ms, **run})
    best = _best(detfleet_runs)
    out["detfleet"] = {
        "runs": detfleet_runs,
        "best": best,
        "best_by_replicas": {
            str(r): _best([x for x in detfleet_runs if x["replicas"] == r]) for r in plan.replicas
        },
    }
    if profile:
        svg = RESULTS / f"profile-{model.key}.svg"
        log(f"{model.key}: py-spy record of replica 1 at the best setting -> {svg}")
        peer = DetfleetPeer(1, best["max_batch"], intra_op_threads=best["intra_op_threads"])
        profiled = await saturated(env, peer, model.path, bodies, count, logs, hint, profile=svg)
        out["detfleet"]["profiled_run"] = {"svg": svg.name, **profiled}

    await _latencies(env, model, bodies, plan, logs, out, best)
    out["ratios"] = _ratios(out)
    out["targets"] = _targets(model.key, out, best)
    return out


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda r: r["tasks_per_s"] or 0.0)


async def _latencies(
    env: BenchEnv,
    model: ModelSpec,
    bodies: Sequence[bytes],
    plan: Plan,
    logs: Path,
    out: dict[str, Any],
    best: dict[str, Any],
) -> None:
    """Latency of the three broker-fed peers at one common rate, then detfleet's sweep."""
    best_peer = DetfleetPeer(best["replicas"], best["max_batch"], intra_op_threads=best["intra_op_threads"])
    peers: dict[str, Peer] = {
        "celery": CeleryPeer(CORES),
        "seed": SeedPeer(CORES),
        "celery_batches": CeleryBatchesPeer(CORES),
        "detfleet": best_peer,
    }
    maxima = [out[name]["tasks_per_s"] for name in ("celery", "seed", "celery_batches")]
    maxima.append(best["tasks_per_s"])
    common = 0.5 * min(m for m in maxima if m)
    out["latency_rate_per_s"] = round(common, 2)
    for name, peer in peers.items():
        log(f"{model.key}: latency of {name} at {common:.1f}/s")
        count = max(30, round(common * plan.paced_seconds))
        target = out[name] if name != "detfleet" else out["detfleet"]
        target["paced"] = await paced(env, peer, model.path, bodies, common, count, logs)
    sweep = []
    for load in SWEEP:
        rate = load * best["tasks_per_s"]
        log(f"{model.key}: detfleet sweep at {load:.0%} ({rate:.1f}/s)")
        count = max(30, round(rate * plan.paced_seconds))
        sweep.append({"load": load, **await paced(env, best_peer, model.path, bodies, rate, count, logs)})
    out["sweep"] = sweep


def _ratios(out: dict[str, Any]) -> dict[str, float | None]:
    detfleet = out["detfleet"]["best"]["tasks_per_s"]
    by_replicas = out["detfleet"]["best_by_replicas"]
    ceiling_rate = out["ceiling"]["best"]["tasks_per_s"]
    celery_rate = out["celery"]["tasks_per_s"]
    return {
        "detfleet_over_ceiling": ratio(detfleet, ceiling_rate),
        "detfleet_over_celery": ratio(detfleet, celery_rate),
        "detfleet_over_seed": ratio(detfleet, out["seed"]["tasks_per_s"]),
        # older results have neither
        "detfleet_over_celery_batches": ratio(detfleet, out.get("celery_batches", {}).get("tasks_per_s")),
        "detfleet_over_machine_limit": ratio(detfleet, out.get("machine_limit", {}).get("tasks_per_s")),
        "detfleet_over_raw_onnx": ratio(detfleet, out["raw_onnx"]["images_per_s"]),
        "detfleet_over_broker_ceiling": ratio(detfleet, out["broker_ceiling"]["tasks_per_s"]),
        "ceiling_over_celery": ratio(ceiling_rate, celery_rate),
        "ceiling_over_raw_onnx": ratio(ceiling_rate, out["raw_onnx"]["images_per_s"]),
        **{
            f"detfleet_{r}_replica_over_ceiling": ratio(run["tasks_per_s"], ceiling_rate)
            for r, run in by_replicas.items()
        },
    }


def _targets(key: str, out: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    ratios = out["ratios"]
    targets: dict[str, Any] = {}
    if key == "default":
        value = ratios["detfleet_over_ceiling"]
        targets["detfleet_over_ceiling"] = _target(value, TARGET_OF_CEILING)
    celery_goal = _target(ratios["detfleet_over_celery"], TARGET_OVER_CELERY)
    if not celery_goal["met"] and (ratios["ceiling_over_celery"] or 0) < TARGET_OVER_CELERY:
        celery_goal["note"] = (
            f"the ceiling itself is {ratios['ceiling_over_celery']}x Celery, under {TARGET_OVER_CELERY:g}x:"
            " the target cannot be reached on this machine"
        )
    targets["detfleet_over_celery"] = celery_goal
    if key == "compute":
        targets["detfleet_over_raw_onnx"] = _target(ratios["detfleet_over_raw_onnx"], TARGET_OF_RAW_ONNX)
    half = next(s for s in out["sweep"] if s["load"] == 0.5)
    compute = best["batch_compute_ms_p50"] or 0.0
    bound = best["max_wait_ms"] + 2 * compute
    p99 = half["latency_ms"]["p99"]
    targets["p99_at_half_load_ms"] = {
        "value": p99,
        "goal": round(bound, 1),
        "met": p99 is not None and p99 <= bound,
        "rule": f"max wait {best['max_wait_ms']} ms + 2 x batch compute {compute:.1f} ms (p50, full batches)",
    }
    return targets


def _target(value: float | None, goal: float) -> dict[str, Any]:
    return {"value": value, "goal": goal, "met": value is not None and value >= goal}


# ---- the machine ----------------------------------------------------------------------------------------


async def describe_machine() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = await asyncio.to_thread(Path("/proc/cpuinfo").read_text)
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    async with Management(DEFAULT_MANAGEMENT_URL) as api:
        overview = await api.request("GET", "/overview")
    conn = await asyncpg.connect(DEFAULT_DATABASE_URL.rsplit("/", 1)[0] + "/postgres")
    try:
        postgres = str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
    return {
        "cpu": cpu,
        "cores": CORES,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "celery": celery.__version__,
        "rabbitmq": overview.get("rabbitmq_version"),
        "erlang": overview.get("erlang_version"),
        "postgres": postgres,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# ---- the whole run -------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.choose(args.quick)
    started = time.monotonic()
    result: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": await describe_machine(),
        "models": {},
    }
    bodies = make_frames(plan.distinct_frames)
    result["frames"] = {
        "size": "640x480",
        "format": "JPEG q90",
        "distinct": len(bodies),
        "mean_bytes": round(sum(map(len, bodies)) / len(bodies)),
        "per_saturated_run": plan.frames,
    }
    env = await BenchEnv.create()
    try:
        with tempfile.TemporaryDirectory(prefix="detfleet-bench-") as scratch:
            folder = Path(scratch)
            logs = folder / "logs"
            logs.mkdir()
            specs = {"default": default_model(folder, args.model), "compute": compute_model(folder)}
            for key in plan.models:
                result["models"][key] = await measure_model(env, specs[key], bodies, plan, logs, args.profile)
                _save(result, args.output)
    finally:
        await env.close()
    log("producer CLI against a bare aio-pika loop")
    result["producer"] = await producer_figures(plan)
    log("prototypes of consumer changes")
    result["prototypes"] = await prototypes.run_all(bodies, args.quick)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


async def scale_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The scale part alone: its own throw-away vhost and database, the shipped model, small frames."""
    plan = scale.ScalePlan.choose(args.quick, args.deepest)
    bodies = make_frames(plan_distinct(args.quick), size=scale.SCALE_FRAME_SIZE)
    env = await BenchEnv.create()
    try:
        with tempfile.TemporaryDirectory(prefix="detfleet-scale-") as scratch:
            folder = Path(scratch)
            logs = folder / "logs"
            logs.mkdir()
            model = default_model(folder, args.model)
            parts = args.parts.split(",") if args.parts else scale.PARTS
            figures = await scale.run_scale(env, model.path, bodies, plan, logs, parts, args.baseline)
    finally:
        await env.close()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    return {"machine": await describe_machine(), "model": model.description, "started_at": started, **figures}


async def strongest_peers(args: argparse.Namespace) -> dict[str, Any]:
    """--peers: the machine's limit, the ceiling, Celery, Celery with celery-batches, seed-style and detfleet
    at its best setting of the last full run, on the default model, all in this one run (ratios hold)."""
    plan = Plan.choose(False)
    bodies = make_frames(plan.distinct_frames)
    count = plan.frames["default"]
    env = await BenchEnv.create()
    out: dict[str, Any] = {"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "frames": count}
    out["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        with tempfile.TemporaryDirectory(prefix="detfleet-peers-") as scratch:
            folder = Path(scratch)
            logs = folder / "logs"
            logs.mkdir()
            model = default_model(folder, args.model).path
            log("peers: the machine's limit")
            out["machine_limit"] = await asyncio.to_thread(ceiling.machine_limit, model, bodies, 16, 10.0)
            log("peers: ceiling")
            out["ceiling"] = await ceiling.pipeline_ceiling(env, model, bodies, count, 16, 0)
            hint = out["ceiling"]["tasks_per_s"]
            peers: dict[str, Peer] = {
                "celery": CeleryPeer(CORES),
                "celery_batches": CeleryBatchesPeer(CORES),
                "seed": SeedPeer(CORES),
                "detfleet": DetfleetPeer(2, 16, intra_op_threads=1),
            }
            for name, peer in peers.items():
                log(f"peers: {name}")
                out[name] = await saturated(env, peer, model, bodies, count, logs, hint)
            common = 0.5 * min(out[n]["tasks_per_s"] or 0.0 for n in peers)
            out["latency_rate_per_s"] = round(common, 2)
            for name, peer in peers.items():
                log(f"peers: latency of {name} at {common:.1f}/s")
                samples = max(30, round(common * plan.paced_seconds))
                out[name]["paced"] = await paced(env, peer, model, bodies, common, samples, logs)
    finally:
        await env.close()
    detfleet = out["detfleet"]["tasks_per_s"]
    out["ratios"] = {
        f"detfleet_over_{name}": ratio(detfleet, out[name]["tasks_per_s"])
        for name in ("machine_limit", "ceiling", "celery", "celery_batches", "seed")
    }
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def run_peers_only(args: argparse.Namespace, docs: Path | None) -> None:
    """--peers: bench/results/peers.json, merged into the last full run's JSON as the default model's
    ``strongest`` table, then the report again."""
    figures = asyncio.run(strongest_peers(args))
    _save(figures, RESULTS / "peers.json")
    log(f"written {RESULTS / 'peers.json'}")
    if docs is not None and report.RESULTS.exists():
        result = json.loads(report.RESULTS.read_text())
        result["models"]["default"]["strongest"] = figures
        _save(result, report.RESULTS)
        report.write(result, report.RESULTS.with_suffix(".png"), docs)
        log(f"written {report.RESULTS} and {docs}")


def merge_parts(earlier: dict[str, Any], later: dict[str, Any], parts: Sequence[str]) -> dict[str, Any]:
    """An earlier scale run with the parts of a later one replaced; ``runs`` says which came from when."""
    merged = dict(earlier)
    keys = [key for part in parts for key in (part, f"{part}_baseline") if key in later]
    for key in keys:
        merged[key] = later[key]
    runs = list(earlier.get("runs") or [_run_note(earlier, [p for p in scale.PARTS if p in earlier])])
    merged["runs"] = [*runs, _run_note(later, list(parts))]
    return merged


def _run_note(figures: dict[str, Any], parts: Sequence[str]) -> dict[str, Any]:
    keys = ("started_at", "seconds", "load_average_at_start", "load_average_at_end")
    return {"parts": list(parts), **{k: figures.get(k) for k in keys}}


def plan_distinct(quick: bool) -> int:
    return Plan.choose(quick).distinct_frames


async def producer_figures(plan: Plan) -> dict[str, Any]:
    args = argparse.Namespace(
        frames=plan.producer_frames,
        rounds=plan.producer_rounds,
        frame_bytes=50_000,
        distinct=100,
        in_flight=256,
    )
    figures = await publish_rate.bench(args)
    figures["producer_over_bare_aio_pika"] = figures.pop("ratio")
    return figures


def _save(result: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a few hundred frames, default model only")
    parser.add_argument("--profile", action="store_true", help="py-spy record a replica (bench/results/)")
    parser.add_argument("--model", type=Path, help="the default model (else models/detfleet-line-320.onnx)")
    parser.add_argument("--output", type=Path, help="JSON results (default bench/results/bench[-quick].json)")
    parser.add_argument(
        "--docs", type=Path, help="Markdown report (default docs/performance.md, not for --quick)"
    )
    parser.add_argument("--scale", action="store_true", help="only the scale part (bench/scale.py)")
    parser.add_argument(
        "--peers", action="store_true", help="only the strongest peers and the machine's limit, one run"
    )
    parser.add_argument("--deepest", type=int, help="--scale: the deepest backlog (default 200,000)")
    parser.add_argument("--parts", help=f"--scale: comma-separated parts (default {','.join(scale.PARTS)})")
    parser.add_argument("--baseline", type=Path, help="--scale: a checkout to run the lane isolation for too")
    args = parser.parse_args()
    docs = args.docs or (None if args.quick else report.DOCS)
    if args.scale:
        run_scale_only(args, docs)
        return
    if args.peers:
        run_peers_only(args, docs)
        return
    args.output = args.output or RESULTS / ("bench-quick.json" if args.quick else "bench.json")
    result = asyncio.run(bench(args))
    if not args.quick:
        log("scale: backlog depth, cameras, replicas, lane isolation")
        result["scale"] = asyncio.run(scale_bench(args))
    _save(result, args.output)
    plot = args.output.with_suffix(".png")
    report.write(result, plot, docs)
    log(f"written {args.output}, {plot}" + (f" and {docs}" if docs else ""))


def run_scale_only(args: argparse.Namespace, docs: Path | None) -> None:
    """--scale: bench/results/scale[-quick].json, then the report again from the last full run's JSON."""
    output = args.output or RESULTS / ("scale-quick.json" if args.quick else "scale.json")
    figures = asyncio.run(scale_bench(args))
    if args.parts and output.exists():
        figures = merge_parts(json.loads(output.read_text()), figures, args.parts.split(","))
    _save(figures, output)
    log(f"written {output}")
    if docs is not None and report.RESULTS.exists():
        result = json.loads(report.RESULTS.read_text())
        result["scale"] = figures
        _save(result, report.RESULTS)
        report.write(result, report.RESULTS.with_suffix(".png"), docs)
        log(f"written {report.RESULTS} and {docs}")


if __name__ == "__main__":
    main()
