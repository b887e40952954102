"""bench/results/bench.json to a plot (PNG, matplotlib Agg) and docs/performance.md.

.venv/bin/python -m bench.report                    # from the last full run's JSON
.venv/bin/python -m bench.report bench/results/bench-quick.json --docs /tmp/performance.md
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DOCS = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
RESULTS = Path(__file__).with_name("results") / "bench.json"
PEERS = (
    "machine_limit",
    "ceiling",
    "broker_ceiling",
    "celery",
    "celery_batches",
    "seed",
    "detfleet_1",
    "detfleet_2",
)
LABELS = {
    "machine_limit": "Machine's limit (a process a core, decode + inference only)",
    "celery_batches": "Celery 5 + celery-batches peer",
    "detfleet": "detfleet, 2 replicas",
    "ceiling": "Ceiling (one process, no broker)",
    "broker_ceiling": "Broker ceiling (aio-pika, no work)",
    "celery": "Celery 5 peer",
    "seed": "Seed-style peer",
    "detfleet_1": "detfleet, 1 replica",
    "detfleet_2": "detfleet, 2 replicas",
}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def peer_rows(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One flat record per table row: tasks/s, latency p50/p99 and its kind, CPU, RSS, settings."""
    rows: dict[str, dict[str, Any]] = {}
    best_ceiling = model["ceiling"]["best"]
    ceiling_threads = best_ceiling.get("intra_op_threads", 0)
    rows["ceiling"] = {
        **best_ceiling,
        "setting": f"batch {best_ceiling['max_batch']}, threads {ceiling_threads}",
    }
    if "machine_limit" in model:
        limit = model["machine_limit"]
        rows["machine_limit"] = {
            **limit,
            "setting": f"{limit['processes']} processes, batch {limit['max_batch']}",
        }
    rows["broker_ceiling"] = {**model["broker_ceiling"], "setting": "prefetch 256, confirms"}
    for name in ("celery", "celery_batches", "seed"):
        if name not in model:
            continue
        peer = model[name]
        rows[name] = {**peer, "latency_ms": peer.get("paced", {}).get("latency_ms"), "setting": "2 workers"}
    best = model["detfleet"]["best"]
    for replicas, run in model["detfleet"]["best_by_replicas"].items():
        same = all(run.get(k) == best.get(k) for k in ("replicas", "max_batch", "intra_op_threads"))
        latency = model["detfleet"].get("paced", {}).get("latency_ms") if same else None
        threads = run.get("intra_op_threads", 0)
        setting = f"max batch {run['max_batch']}, wait {run['max_wait_ms']} ms, threads {threads}"
        rows[f"detfleet_{replicas}"] = {**run, "latency_ms": latency, "setting": setting}
    return rows


def _peer_table(model: dict[str, Any]) -> list[str]:
    lines = [
        "| Peer | Setting | tasks/s | p50 ms | p99 ms | CPU workers (cores) | CPU broker | CPU Postgres"
        " | peak RSS MiB (largest / all) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in peer_rows(model).items():
        latency = row.get("latency_ms") or {}
        lines.append(
            f"| {LABELS[key]} | {row['setting']} | {_fmt(row['tasks_per_s'])} | {_fmt(latency.get('p50'))}"
            f" | {_fmt(latency.get('p99'))} | {_fmt(row.get('cpu_cores_workers'), 2)}"
            f" | {_fmt(row.get('cpu_cores_broker'), 2)} | {_fmt(row.get('cpu_cores_postgres'), 2)}"
            f" | {_fmt(row.get('peak_rss_mib_max'))} / {_fmt(row.get('peak_rss_mib_sum'))} |"
        )
    return lines


def _strongest(run: dict[str, Any] | None) -> list[str]:
    """The strongest peers and the machine's limit, measured together in one ``--peers`` run."""
    if not run:
        return []
    lines = [
        "",
        "The strongest peers and the machine's limit, all measured in one run"
        f" (`python -m bench.run --peers`, started {run['started_at']}, load average"
        f" {run['load_average_at_start']} at start and"
        f" {run['load_average_at_end']} at end; {run['frames']} frames a saturated run, latency at"
        f" {run['latency_rate_per_s']}/s for every broker-fed peer):",
        "",
        "| Peer | tasks/s | detfleet / it | p50 ms | p99 ms | CPU workers (cores)"
        " | peak RSS MiB (largest / all) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("machine_limit", "ceiling", "celery", "celery_batches", "seed", "detfleet"):
        row = run[name]
        latency = (row.get("paced") or {}).get("latency_ms") or {}
        against = run["ratios"].get(f"detfleet_over_{name}") if name != "detfleet" else 1.0
        lines.append(
            f"| {LABELS[name]} | {_fmt(row['tasks_per_s'])} | {_fmt(against, 3)} | {_fmt(latency.get('p50'))}"
            f" | {_fmt(latency.get('p99'))} | {_fmt(row.get('cpu_cores_workers'), 2)}"
            f" | {_fmt(row.get('peak_rss_mib_max'))} / {_fmt(row.get('peak_rss_mib_sum'))} |"
        )
    return lines


def _targets(model: dict[str, Any]) -> list[str]:
    lines = ["| Target | Value | Goal | Met |", "|---|---:|---:|---|"]
    for name, target in model["targets"].items():
        note = f" ({target['note']})" if target.get("note") else ""
        rule = f" ({target['rule']})" if target.get("rule") else ""
        met = "yes" if target["met"] else "**no**"
        lines.append(f"| {name}{rule} | {_fmt(target['value'], 3)} | {target['goal']} | {met}{note} |")
    return lines


def _sweep(model: dict[str, Any]) -> list[str]:
    lines = [
        "| Load | Offered /s | Achieved /s | p50 ms | p99 ms | batch compute p50 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for point in model["sweep"]:
        latency = point["latency_ms"]
        lines.append(
            f"| {point['load']:.0%} | {_fmt(point['offered_per_s'])} | {_fmt(point['achieved_per_s'])}"
            f" | {_fmt(latency['p50'])} | {_fmt(latency['p99'])} | {_fmt(point['batch_compute_ms_p50'])} |"
        )
    return lines


def _grid(model: dict[str, Any]) -> list[str]:
    lines = [
        "| Replicas | Max batch | intra-op threads | tasks/s | mean batch | batch compute p50 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for run in model["detfleet"]["runs"]:
        lines.append(
            f"| {run['replicas']} | {run['max_batch']} | {run.get('intra_op_threads', 0)}"
            f" | {_fmt(run['tasks_per_s'])} | {_fmt(run['batch_size_mean'])}"
            f" | {_fmt(run['batch_compute_ms_p50'])} |"
        )
    ceiling_runs = ", ".join(
        f"batch {r['max_batch']} with {r.get('intra_op_threads', 0)} threads {_fmt(r['tasks_per_s'])}/s"
        for r in model["ceiling"]["runs"]
    )
    raw_runs = model["raw_onnx"].get("per_threads") or {"0": model["raw_onnx"]}
    raw = "; ".join(
        f"{threads} threads: " + ", ".join(f"batch {b} {r}/s" for b, r in figures["per_batch"].items())
        for threads, figures in raw_runs.items()
    )
    return [
        *lines,
        "",
        f"Ceiling: {ceiling_runs}. Raw ONNX Runtime (intra-op threads, 0 = one a core): {raw}.",
    ]


def _machine(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    loads = [*m["load_average_at_start"][:1], *(m.get("load_average_at_end") or [])[:1]]
    peak = max(loads, default=0.0)
    shared = [
        f"- **The machine was not quiet** (1-minute load average up to {peak} on {m['cores']} cores):"
        " other work shared the CPU, so these figures are not representative. Re-run `make bench` on a"
        " quiet machine."
    ]
    return [
        *(shared if peak > m["cores"] else []),
        f"- CPU: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}",
        f"- RabbitMQ {m['rabbitmq']} (Erlang {m['erlang']}), Postgres {m['postgres']}, on the same machine",
        f"- Python {m['python']}, ONNX Runtime {m['onnxruntime']} (CPU provider), Celery {m['celery']}",
        f"- load average at start {m['load_average_at_start']}, at end {m.get('load_average_at_end')}",
        f"- frames: {result['frames']['distinct']} distinct {result['frames']['size']}"
        f" {result['frames']['format']}"
        f" (mean {result['frames']['mean_bytes']} bytes), cycled; backlog per saturated run:"
        f" {result['frames']['per_saturated_run']}",
        f"- mode: {result['mode']}, {result.get('seconds')} s in all, started {result['started_at']}",
    ]


def markdown(result: dict[str, Any], plot: Path, docs: Path) -> str:
    out = [
        "# Performance",
        "",
        "Generated by `make bench` (`python -m bench.run`) from `bench/results/bench.json`; do not edit by"
        " hand, re-run instead. Method, peers and their configuration: the docstrings of `bench/run.py`,"
        " `bench/ceiling.py` and `bench/peers/`.",
        "",
        "## Machine",
        "",
        *_machine(result),
        "",
        f"![throughput and latency]({_relative(plot, docs)})",
        "",
        "How to read the table: tasks/s over a pre-published backlog (first receipt to last committed row);"
        " p50/p99 are publish-to-committed-row latencies of Celery, seed-style and detfleet (best setting)"
        " at one common paced rate, half of the slowest one's maximum; the ceiling's latency is batch start"
        " to row (nothing queues), the broker ceiling's is publish to receipt while publishing at full speed."
        " CPU is in cores busy over the measured phase (1.0 = one core), RSS the workers' peak.",
        "",
    ]
    for key, model in result["models"].items():
        out += [f"## Model: {key}", "", f"{model['model']['description']} (`{model['model']['file']}`).", ""]
        out += _peer_table(model)
        out += _strongest(model.get("strongest"))
        out += ["", f"Common paced rate for latency: {model['latency_rate_per_s']}/s.", "", "Ratios:", ""]
        out += [f"- `{name}`: {_fmt(value, 3)}" for name, value in model["ratios"].items()]
        out += ["", "Targets:", "", *_targets(model), "", "detfleet latency sweep (best setting):", ""]
        out += [*_sweep(model), "", "detfleet settings tried:", "", *_grid(model), ""]
    scale = result.get("scale")
    scale_png = plot.with_name("scale.png") if scale else None
    out += scale_lines(scale, scale_png, docs)
    out += _producer(result) + _prototypes(result) + LIMITS + _gpu()
    return "\n".join(out) + "\n"


def _producer(result: dict[str, Any]) -> list[str]:
    p = result.get("producer")
    if not p:
        return []
    return [
        "## Producer",
        "",
        f"`detfleet produce` confirmed {p['produce_per_s']}/s against {p['bare_per_s']}/s for a bare aio-pika"
        f" loop with the same {p['in_flight']} publishes in flight ({p['frames']} frames of about"
        f" {p['frame_bytes']} bytes, median of {p['rounds']} rounds):"
        f" `producer_over_bare_aio_pika` = {p['producer_over_bare_aio_pika']}.",
        "",
    ]


def _prototypes(result: dict[str, Any]) -> list[str]:
    p = result.get("prototypes")
    if not p:
        return []
    d, s = p["reduced_decode"], p["sink"]
    return [
        "## Per-message savings measured (bench/prototypes.py)",
        "",
        *_reduced_decode_lines(d),
        f"- Sink, {s['rows_per_batch']} rows a batch, ms per batch: "
        + ", ".join(f"{k} {v}" for k, v in s["ms_per_batch"].items())
        + ". The one-statement unnest upsert the sink uses is already the cheapest form that keeps the"
        " conflict rules; a bare COPY cannot express them.",
        *_ack_lines(p.get("ack_frames")),
        "",
    ]


def _reduced_decode_lines(d: dict[str, Any]) -> list[str]:
    """Results of bench/decode_scale.py's decode part; older results named the two figures differently."""
    before = d.get("before_ms", d.get("full_decode_letterbox_ms"))
    after = d.get("after_ms", d.get("reduced_decode_letterbox_ms"))
    return [
        f"- Reduced-scale JPEG decode (consumer/decode.py: the smallest libjpeg scale that covers the model"
        f" input, here `cv2.IMREAD_REDUCED_COLOR_2`) for a {d['canvas']} model: decode and letterbox"
        f" {before} ms a frame at full scale -> {after} ms ({d['saving']:.0%} less); the model input differs"
        f" by {d['input_mean_abs_difference_0_255']} grey levels on average (libjpeg's scaled IDCT against a"
        " linear resize). Before and after end to end and in accuracy: `python -m bench.decode_scale`.",
    ]


def _ack_lines(acks: dict[str, Any] | None) -> list[str]:
    if not acks:
        return []
    rates = acks["consume_per_s"]
    return [
        f"- Ack frames: a consumer doing no work (prefetch {acks['prefetch']}, batches of {acks['batch']})"
        f" consumed {rates['ack_per_message']}/s acking message by message and"
        f" {rates['ack_multiple_per_batch']}/s with one multiple=true ack a batch"
        f" (`multiple_over_per_message` = {acks['multiple_over_per_message']})."
        " The worker now flushes its acks once a batch, one frame per channel.",
    ]


# What profiling (py-spy, bench/results/profile-*.svg) says limits detfleet on this kind of machine.
LIMITS = [
    "## What limits detfleet here",
    "",
    "- Two cores run the broker, Postgres, the producer of the backlog and the fleet. With the shipped model"
    " a replica is bound by its inference thread (about 85% inside `session.run`, 11% in the letterbox);"
    " two replicas with one ONNX Runtime thread each use both cores and pass the one-process ceiling,"
    " which runs decode, inference and the sink one after the other.",
    "- Celery and the seed-style consumer run one image per inference; on two cores that costs less than the"
    " batching gains, so detfleet leads them by about 1.8x, short of 3x. The ceiling itself is under 3x"
    " Celery here: the target needs a machine where batching pays more (more cores, a GPU).",
    "- Celery with celery-batches batches as detfleet does (16 frames, a process a core) and drains a backlog"
    " about as fast on these 2 cores (the `--peers` table); what it gives up shows at a paced rate: its"
    " buffer flushes on a timer in the worker's main process and the prefork pool takes one batch a child, so"
    " its latency is several times detfleet's; and a failed batch is acked whole (no retry, no DLQ).",
    "- The machine's limit (a process a core decoding and inferring from memory) is what the CPU can do at"
    " all; the broker, Postgres and the Python around every frame share the same 2 cores with the fleet.",
    "- With the compute-bound model every design is bound by ONNX Runtime; detfleet stays a few percent"
    " under raw inference because decoding, acks, the broker and Postgres take that share of two cores.",
    "- JPEG frames are decoded at the smallest libjpeg scale that covers the model input (1/2 for 640x480"
    " frames and the 320 model), and the detector maps boxes back to source pixels; the fleet test and the"
    " in-process detector decode through the same function (`consumer.decode.decode_frame`).",
    "",
]

GPU_RESULTS = Path(__file__).with_name("results") / "gpu.json"


def _gpu(results: Path = GPU_RESULTS) -> list[str]:
    """How to run bench/gpu.py, and its summary once its JSON is in bench/results/gpu.json."""
    lines = [
        "## GPU",
        "",
        "`bench/gpu.py` measures the compute-bound model (rebuilt layer for layer in PyTorch) on a GPU"
        " machine with CUDA 13, PyTorch and the CPU build of onnxruntime, without network: PyTorch on CUDA"
        " in fp32 and fp16 at batch 1 to 64 (model alone, and with the host-to-device copy), the letterbox"
        " on the GPU against OpenCV on the CPU, and the same graph in ONNX Runtime on that machine's CPU."
        " It needs no other package; should `torch.onnx.export` ask for `onnx`, bring its wheel"
        " (about 17 MB, well under the 64 MiB allowed) and `pip install --no-index` it. To run it:",
        "",
        "```",
        "# on the GPU machine, with this one file copied there",
        "python gpu.py --seconds 3 --out gpu.json",
        "# back here: put gpu.json in bench/results/ and regenerate this page",
        ".venv/bin/python -m bench.report",
        "```",
        "",
    ]
    if not results.exists():
        return [*lines, "Not run yet: no GPU machine was available when these figures were taken.", ""]
    summary = json.loads(results.read_text()).get("summary", [])
    return [*lines, "Figures from `bench/results/gpu.json`:", "", *(f"- {line}" for line in summary), ""]


def _relative(path: Path, docs: Path) -> str:
    return Path(os.path.relpath(path.resolve(), docs.resolve().parent)).as_posix()


def plot(result: dict[str, Any], path: Path) -> None:
    models = list(result["models"].items())
    figure, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    for row, (key, model) in enumerate(models):
        rows = peer_rows(model)
        names = [k for k in PEERS if k in rows]
        rates = [rows[k]["tasks_per_s"] or 0 for k in names]
        left = axes[row][0]
        palette = {"celery": "#d62", "celery_batches": "#c51", "seed": "#e93", "detfleet_1": "#27b"}
        colors = [palette.get(k, "#16a" if k.startswith("detfleet") else "#999") for k in names]
        left.barh([LABELS[k] for k in names], rates, color=colors)
        left.invert_yaxis()
        left.set_xlabel("tasks/s")
        left.set_title(f"{key} model: throughput")
        right = axes[row][1]
        offered = [p["achieved_per_s"] or p["offered_per_s"] for p in model["sweep"]]
        right.plot(offered, [p["latency_ms"]["p50"] for p in model["sweep"]], "o-", label="detfleet p50")
        right.plot(offered, [p["latency_ms"]["p99"] for p in model["sweep"]], "s--", label="detfleet p99")
        for name, marker in (("celery", "^"), ("seed", "v")):
            paced = model[name].get("paced")
            if paced:
                right.plot(
                    [paced["achieved_per_s"]], [paced["latency_ms"]["p99"]], marker, label=f"{name} p99"
                )
        right.set_xlabel("tasks/s")
        right.set_ylabel("publish to row, ms")
        right.set_yscale("log")
        right.set_title(f"{key} model: latency at 25/50/75/100% load")
        right.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(result: dict[str, Any], plot_path: Path, docs: Path | None) -> None:
    plot(result, plot_path)
    if result.get("scale"):
        scale_plot(result["scale"], plot_path.with_name("scale.png"))
    if docs is not None:
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(markdown(result, plot_path, docs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("results", type=Path, nargs="?", default=RESULTS)
    parser.add_argument("--docs", type=Path, default=DOCS)
    args = parser.parse_args()
    result = json.loads(args.results.read_text())
    write(result, args.results.with_suffix(".png"), args.docs)


# ---- the scale part (bench/scale.py) ------------------------------------------------------------------


def _yes(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "**no**")


def _scale_lanes(title: str, lanes: dict[str, Any]) -> list[str]:
    lines = [
        title,
        "",
        "| Max batch | batches in flight | idle p50 ms | idle p99 ms | backlog p50 ms | backlog p99 ms"
        " | p99 backlog / idle | within 2x | bulk drained meanwhile /s |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for point in lanes.values():
        idle, loaded = point["idle"]["latency_ms"], point["backlog"]["latency_ms"]
        lines.append(
            f"| {point['max_batch']} | {point.get('batches_in_flight', 2)} | {_fmt(idle['p50'])}"
            f" | {_fmt(idle['p99'])} | {_fmt(loaded['p50'])}"
            f" | {_fmt(loaded['p99'])} | {_fmt(point['backlog_p99_over_idle_p99'], 2)} | {_yes(point['met'])}"
            f" | {_fmt(point['backlog'].get('bulk_per_s_meanwhile'))} |"
        )
    return [*lines, ""]


def per_core(run: dict[str, Any]) -> float | None:
    """Frames per second of the workers' busy CPU: the rate a run would have had with one whole core,
    which the neighbours' load on a shared machine moves far less than the rate itself."""
    rate, cores = run.get("tasks_per_s"), run.get("cpu_cores_workers")
    return round(rate / cores, 1) if rate and cores else None


def _per_core_ratio(first: dict[str, Any], last: dict[str, Any]) -> str:
    a, b = per_core(first), per_core(last)
    return _fmt(round(b / a, 3) if a and b else None, 3)


def _scale_backlog(backlog: dict[str, Any]) -> list[str]:
    lines = [
        "| Bulk storage | Backlog | published /s | drained /s | per worker core /s | broker queue memory MiB"
        " | bodies in RAM MiB | node memory MiB | persistent bodies MiB | replica peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for storage, part in backlog.items():
        for run in part["runs"]:
            broker = run["broker"]
            lines.append(
                f"| {storage} ({broker.get('mode')}) | {run['backlog']:,} | {_fmt(run['publish_per_s'])}"
                f" | {_fmt(run['tasks_per_s'])} | {_fmt(per_core(run))}"
                f" | {_fmt(broker.get('queue_memory_mib'))}"
                f" | {_fmt(broker.get('message_bytes_ram_mib'))} | {_fmt(broker.get('node_memory_mib'))}"
                f" | {_fmt(broker.get('message_bytes_persistent_mib'))}"
                f" | {_fmt(run.get('peak_rss_mib_max'))} |"
            )
    lines.append("")
    for storage, part in backlog.items():
        lines.append(
            f"- {storage}: deepest / shallowest drain rate = {_fmt(part['deepest_over_shallowest'], 3)}"
            f" (goal >= 0.9: {_yes(part['met'])}); per worker core:"
            f" {_per_core_ratio(part['runs'][0], part['runs'][-1])}"
        )
    return [*lines, ""]


def _scale_replicas(replicas: dict[str, Any]) -> list[str]:
    lines = [
        "| intra-op threads | Replicas | tasks/s | workers' CPU (cores) | per worker core /s"
        " | RSS per replica MiB | prefetch (bodies held MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for threads, part in replicas.items():
        for run in part["runs"]:
            lines.append(
                f"| {threads} | {run['replicas']} | {_fmt(run['tasks_per_s'])}"
                f" | {_fmt(run.get('cpu_cores_workers'), 2)} | {_fmt(per_core(run))}"
                f" | {_fmt(run['rss_mib_per_replica'])}"
                f" | {run['prefetch']} ({_fmt(run['prefetch_bodies_mib'])}) |"
            )
    lines.append("")
    for threads, part in replicas.items():
        lines.append(
            f"- {threads} intra-op threads: the most replicas / the best count"
            f" = {_fmt(part['most_over_best'], 3)}"
            f" (no collapse, >= 0.8: {_yes(part['met'])})"
        )
    return [*lines, ""]


def _scale_cameras(cameras: dict[str, Any]) -> list[str]:
    runs = ", ".join(
        f"{r['cameras']:,} camera(s) {_fmt(r['tasks_per_s'])}/s ({_fmt(per_core(r))}/s per worker core)"
        for r in cameras["runs"]
    )
    first, last = cameras["runs"][0], cameras["runs"][-1]
    return [
        f"Cameras: {runs}; many / one = {_fmt(cameras['many_over_one'], 3)} (goal >= 0.95:"
        f" {_yes(cameras['met'])}); per worker core: {_per_core_ratio(first, last)}.",
        "",
    ]


def scale_lines(scale: dict[str, Any] | None, plot: Path | None, docs: Path) -> list[str]:
    if not scale:
        return []
    out = [
        "## Scale (bench/scale.py)",
        "",
        f"`python -m bench.run --scale` (`make bench-scale`), {scale.get('seconds')} s, load average"
        f" {scale.get('load_average_at_start')} at start and {scale.get('load_average_at_end')} at end;"
        f" {scale['frame_size']} frames of {scale['frame_bytes_mean']} bytes on average, the shipped model,"
        " 2 replicas at max batch 16 with one ONNX Runtime thread unless a table says otherwise. The"
        " machine is shared: compare the ratios, each measured within one run, not the absolute rates; where"
        ' the workers got very different shares of the CPU, "per worker core" (frames/s over the workers\''
        " busy cores) is the fairer comparison.",
        "",
    ]
    for note in scale.get("runs") or []:
        out.append(
            f"- {', '.join(note['parts'])}: run started {note.get('started_at') or '-'},"
            f" {note.get('seconds')} s, load average {note.get('load_average_at_start')} at start,"
            f" {note.get('load_average_at_end')} at end"
        )
    if scale.get("runs"):
        out.append("")
    if plot is not None:
        out += [f"![scale]({_relative(plot, docs)})", ""]
    if "backlog" in scale:
        out += ["### Backlog depth", "", *_scale_backlog(scale["backlog"])]
    if "cameras" in scale:
        out += ["### Cameras", "", *_scale_cameras(scale["cameras"])]
    if "replicas" in scale:
        out += ["### Replicas on this machine's cores", "", *_scale_replicas(scale["replicas"])]
    if "lanes" in scale:
        out += ["### Lane isolation", ""]
        first = _first(scale["lanes"])
        out += _scale_lanes(
            f"Realtime frames at {first['idle']['realtime_rate']}/s, publish to row, with the bulk lane empty"
            f" and with {first['backlog']['bulk_backlog']:,} bulk frames waiting:",
            scale["lanes"],
        )
        if "lanes_baseline" in scale:
            out += _scale_lanes(
                "The same with the code before the last lane-isolation change (`--baseline`), same run:",
                scale["lanes_baseline"],
            )
    return out


def _first(parts: dict[str, Any]) -> dict[str, Any]:
    return next(iter(parts.values()))


def scale_plot(scale: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    if "backlog" in scale:
        for storage, part in scale["backlog"].items():
            depths = [r["backlog"] for r in part["runs"]]
            axes[0].plot(
                depths, [r["tasks_per_s"] or 0 for r in part["runs"]], "o-", label=f"{storage}: drained/s"
            )
            cores = [per_core(r) or 0 for r in part["runs"]]
            axes[0].plot(depths, cores, "s--", label=f"{storage}: per worker core")
        axes[0].set_xscale("log")
        axes[0].set_xlabel("bulk backlog (frames)")
        axes[0].set_ylabel("tasks/s")
        axes[0].set_title("drain rate by backlog depth")
        axes[0].legend()
    if "replicas" in scale:
        for threads, part in scale["replicas"].items():
            counts = [r["replicas"] for r in part["runs"]]
            axes[1].plot(
                counts, [r["tasks_per_s"] or 0 for r in part["runs"]], "o-", label=f"{threads} threads"
            )
            cores = [per_core(r) or 0 for r in part["runs"]]
            axes[1].plot(counts, cores, "s--", label=f"{threads} threads, per worker core")
        axes[1].set_xlabel("replicas (2 cores)")
        axes[1].set_ylabel("tasks/s")
        axes[1].set_title("replicas")
        axes[1].legend()
    if "lanes" in scale:
        series = [("after", scale["lanes"])]
        if "lanes_baseline" in scale:
            series.insert(0, ("before", scale["lanes_baseline"]))
        labels, values = [], []
        for name, lanes in series:
            for point in lanes.values():
                for state in ("idle", "backlog"):
                    setting = f"b{point['max_batch']}/{point.get('batches_in_flight', 2)}"
                    labels.append(f"{name} {setting} {state}")
                    values.append(point[state]["latency_ms"]["p99"] or 0)
        axes[2].barh(labels, values, color="#27b")
        axes[2].invert_yaxis()
        axes[2].set_xscale("log")
        axes[2].set_xlabel("realtime p99 ms")
        axes[2].set_title("lane isolation")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
