"""Per-frame CPU cost of each stage, measured on this machine: the inputs of detfleet/capacity.py.

- decode: libjpeg at the reduced scale the consumer uses (``consumer.decode.decode_frame``), one thread, on
  the bench's synthetic JPEG q90 frames at 320x240 and 640x480 (so the cost per KB of JPEG is a line);
- letterbox: the shipped detector's preprocess of a decoded frame into its input tensor;
- inference: ONNX Runtime alone, one intra-op thread, at batch 1 to 16 (ms of one core per image);
- AMQP: persistent publishes with confirms and consumes with acks of the same frames, no work
  (bench/ceiling.py's broker ceiling), at both frame sizes: CPU of the broker and of the client per message;
- sink: the worker's one-statement upsert of a 16-row batch (bench/prototypes.py), ms per row.

    .venv/bin/python -m bench.stage_costs      # about 3 minutes on 2 cores; bench/results/stage_costs.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import ceiling, prototypes
from bench.common import BenchEnv, make_frames
from consumer.decode import decode_frame
from consumer.detector import DetectorConfig, load_detector
from consumer.detector.preprocess import InputBuffer
from shared.settings import shipped_model_path

RESULTS = Path(__file__).with_name("results") / "stage_costs.json"
SIZES = ((320, 240), (640, 480))
BATCHES = (1, 2, 4, 8, 16)
ROUNDS = 3


def _ms_per_call(call: Callable[[], object], seconds: float) -> float:
    call()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or calls < 5:
        call()
        calls += 1
    return (time.perf_counter() - started) * 1000 / calls


def decode_and_letterbox(model: Path, bodies: Sequence[bytes], seconds: float) -> dict[str, float]:
    """ms a frame of decode_frame, and of the detector's preprocess of the decoded frames."""
    detector = load_detector(DetectorConfig(model_path=model, device="cpu", intra_op_threads=1))
    size = detector.info.input_size
    index = iter(range(10**9))

    def decode() -> object:
        return decode_frame(bodies[next(index) % len(bodies)], size)

    frames = [f for f in (decode_frame(b, size) for b in bodies) if not isinstance(f, str)]
    buffer = InputBuffer(size)

    def fill() -> object:
        return buffer.fill([frames[next(index) % len(frames)].pixels], rows=1)

    return {
        "jpeg_kb": round(statistics.mean(len(b) for b in bodies) / 1000, 1),
        "decode_ms": round(_ms_per_call(decode, seconds), 3),
        "letterbox_ms": round(_ms_per_call(fill, seconds), 3),
    }


async def amqp(env: BenchEnv, bodies: Sequence[bytes], count: int) -> dict[str, Any]:
    run = await ceiling.broker_ceiling(env, bodies, count)
    rate = run["tasks_per_s"]
    return {
        "jpeg_kb": round(statistics.mean(len(b) for b in bodies) / 1000, 1),
        "messages_per_s": rate,
        "broker_cpu_ms_per_message": round(1000 * run["cpu_cores_broker"] / rate, 3),
        "client_cpu_ms_per_message": round(1000 * run["cpu_cores_workers"] / rate, 3),
    }


async def measure(seconds: float, messages: int) -> dict[str, Any]:
    model = shipped_model_path()
    out: dict[str, Any] = {"model": model.name, "decode": [], "amqp": []}
    # The machine is shared: each figure is the least of ROUNDS (the cost without others' work in it).
    raws = [ceiling.raw_onnx(model, BATCHES, seconds, threads=1)["per_batch"] for _ in range(ROUNDS)]
    out["inference_ms_per_image"] = {b: round(1000 / max(r[b] for r in raws), 3) for b in raws[0]}
    env = await BenchEnv.create()
    try:
        for size in SIZES:
            bodies = make_frames(50, size=size)
            named = {"size": f"{size[0]}x{size[1]}"}
            decodes = [decode_and_letterbox(model, bodies, seconds) for _ in range(ROUNDS)]
            out["decode"].append({**named, **{k: min(d[k] for d in decodes) for k in decodes[0]}})
            runs = [await amqp(env, bodies, messages) for _ in range(ROUNDS)]
            out["amqp"].append({**named, **min(runs, key=lambda r: r["broker_cpu_ms_per_message"])})
    finally:
        await env.close()
    sink = await prototypes.sink_statements(16, 200)
    out["sink_ms_per_row"] = round(sink["ms_per_batch"]["unnest_upsert"] / 16, 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="per timed loop")
    parser.add_argument("--messages", type=int, default=3000, help="AMQP messages per frame size")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    figures = asyncio.run(measure(args.seconds, args.messages))
    args.output.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
