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
PEERS = ("ceiling", "broker_ceiling", "celery", "seed", "detfleet_1", "detfleet_2")
LABELS = {
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
    rows["broker_ceiling"] = {**model["broker_ceiling"], "setting": "prefetch 256, confirms"}
    for name in ("celery", "seed"):
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
        out += ["", f"Common paced rate for latency: {model['latency_rate_per_s']}/s.", "", "Ratios:", ""]
        out += [f"- `{name}`: {_fmt(value, 3)}" for name, value in model["ratios"].items()]
        out += ["", "Targets:", "", *_targets(model), "", "detfleet latency sweep (best setting):", ""]
        out += [*_sweep(model), "", "detfleet settings tried:", "", *_grid(model), ""]
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
        left.barh([LABELS[k] for k in names], rates, color=["#999", "#bbb", "#d62", "#e93", "#27b", "#16a"])
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


if __name__ == "__main__":
    main()
