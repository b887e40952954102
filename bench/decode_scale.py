"""Reduced-scale JPEG decoding, before and after, measured in one run on one machine.

1. decode + letterbox, one thread, per frame: the full-scale decode the consumer did before (decode_at at
   1/1, what decode_image did) against decode_frame (the smallest libjpeg scale that covers the model
   input), both into the shipped model's input tensor, on 640x480 JPEG q90 frames of detfleet.synth;
   alternating rounds, the median kept;
2. the shipped detector's held-out accuracy in the model card's settings (models/README.md: 500 frames
   640x480 from seed 5000000 and 200 frames of mixed sizes from seed 6000000, JPEG q90) through both decodes;
3. end to end: ``detfleet consume`` replicas on a pre-published backlog (bench.peers.runners.saturated, as
   ``make bench`` runs them), the code of --before (exported with git archive, run from its own tree)
   against this tree, alternating rounds.

    .venv/bin/python -m bench.decode_scale --before main     # about 3 minutes on 2 cores
    .venv/bin/python -m bench.decode_scale --skip-fleet      # parts 1 and 2 only, no broker or database

Writes bench/results/decode_scale.json and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import BenchEnv, make_frames
from bench.peers.runners import DetfleetPeer, saturated
from consumer.decode import decode_at, decode_frame
from consumer.detector import DecodedFrame, Detector, DetectorConfig, load_detector
from consumer.detector.preprocess import InputBuffer
from detfleet import accuracy, synth
from shared.frames import inspect_frame
from shared.settings import shipped_model_path

RESULTS = Path(__file__).with_name("results") / "decode_scale.json"
REPO = Path(__file__).resolve().parents[1]
Decode = Callable[[bytes, tuple[int, int]], DecodedFrame | str]
# The model card's held-out sets (models/README.md; detfleet/train.py, which needs torch, defines them).
HELD_OUT = (5_000_000, 500, ((640, 480),))
MIXED_OUT = (6_000_000, 200, ((500, 375), (375, 500), (1280, 720), (333, 250), (800, 600), (480, 640)))
JPEG_QUALITY = 90


def full_scale(body: bytes, input_size: tuple[int, int]) -> DecodedFrame | str:
    """The decode before this change: every frame at full scale, whatever the model's input."""
    return decode_at(body, inspect_frame(body), 1)


def _decoded(decode: Decode, body: bytes, input_size: tuple[int, int]) -> DecodedFrame:
    frame = decode(body, input_size)
    if isinstance(frame, str):
        raise ValueError(frame)
    return frame


# ---- 1. decode + letterbox per frame -------------------------------------------------------------------


def _per_frame_ms(decode: Decode, bodies: Sequence[bytes], input_size: tuple[int, int]) -> float:
    buffer = InputBuffer(input_size)
    started = time.perf_counter()
    for body in bodies:
        buffer.fill([_decoded(decode, body, input_size).pixels])
    return (time.perf_counter() - started) * 1000 / len(bodies)


def decode_letterbox(bodies: Sequence[bytes], input_size: tuple[int, int], rounds: int) -> dict[str, Any]:
    """Milliseconds a frame, median of alternating rounds, and how far apart the two model inputs are."""
    before, after = [], []
    for _ in range(rounds):
        before.append(_per_frame_ms(full_scale, bodies, input_size))
        after.append(_per_frame_ms(decode_frame, bodies, input_size))
    full, reduced = statistics.median(before), statistics.median(after)
    first = _decoded(decode_frame, bodies[0], input_size)
    return {
        "frame": "x".join(str(v) for v in first.source_size),
        "canvas": "x".join(str(v) for v in input_size),
        "reduction": f"1/{first.reduction}",
        "before_ms": round(full, 3),
        "after_ms": round(reduced, 3),
        "saving": round(1 - reduced / full, 3),
        "rounds": rounds,
        "input_mean_abs_difference_0_255": round(_input_difference(bodies[0], input_size), 2),
    }


def _input_difference(body: bytes, input_size: tuple[int, int]) -> float:
    """Mean absolute difference of the two model inputs (0-255 scale): libjpeg's scaled IDCT against a
    linear resize of the full decode, so not bit-identical."""
    full, _ = InputBuffer(input_size).fill([_decoded(full_scale, body, input_size).pixels])
    full = full.copy()
    reduced, _ = InputBuffer(input_size).fill([_decoded(decode_frame, body, input_size).pixels])
    return float(np.abs(full - reduced).mean() * 255)


# ---- 2. held-out accuracy --------------------------------------------------------------------------------


def _held_out_bodies(seed: int, count: int, sizes: Sequence[tuple[int, int]]) -> list[tuple[bytes, Any]]:
    out = []
    for index in range(count):
        scene = synth.render_scene(seed + index, sizes[index % len(sizes)])
        ok, data = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError("OpenCV could not encode a held-out frame")
        out.append((data.tobytes(), scene.boxes))
    return out


def _scores(detector: Detector, decode: Decode, frames: Sequence[tuple[bytes, Any]]) -> dict[str, Any]:
    size = detector.info.input_size
    predicted: list[tuple[synth.Box, ...]] = []
    for start in range(0, len(frames), 16):
        decoded = [_decoded(decode, body, size) for body, _ in frames[start : start + 16]]
        found = detector.detect(decoded)
        predicted += [tuple(synth.Box(d.class_id, *d.box, score=d.score) for d in image) for image in found]
    scores = accuracy.score(predicted, [truth for _, truth in frames], synth.CLASS_NAMES)
    return {
        "precision": round(float(scores.precision), 3),
        "recall": round(float(scores.recall), 3),
        "map50": round(float(scores.map50), 3),
        "true_positives": int(scores.true_positives),
        "false_positives": int(scores.false_positives),
        "false_negatives": int(scores.false_negatives),
    }


def held_out_accuracy(detector: Detector) -> dict[str, Any]:
    sets = {
        "main": _held_out_bodies(*HELD_OUT),
        "mixed": _held_out_bodies(*MIXED_OUT),
    }
    return {
        name: {
            "before": _scores(detector, full_scale, frames),
            "after": _scores(detector, decode_frame, frames),
        }
        for name, frames in sets.items()
    }


# ---- 3. the fleet end to end -----------------------------------------------------------------------------


def export_tree(revision: str, folder: Path) -> str:
    """The files of ``revision`` in folder (git archive: no worktree, nothing checked out); its commit."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", revision], check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return commit


async def fleet(
    model: Path, before_tree: Path, bodies: Sequence[bytes], count: int, rounds: int, logs: Path
) -> dict[str, Any]:
    """tasks/s of 2 replicas (max batch 16, one ONNX Runtime thread: make bench's best setting here), and
    the replicas' CPU time per task, which other load on a shared machine disturbs less than the rate."""
    env = await BenchEnv.create()
    rates: dict[str, list[float | None]] = {"before": [], "after": []}
    cpu_ms: dict[str, list[float]] = {"before": [], "after": []}
    try:
        for _ in range(rounds):
            for name, tree in (("before", before_tree), ("after", REPO)):
                peer = DetfleetPeer(replicas=2, max_batch=16, intra_op_threads=1, cwd=tree)
                run = await saturated(env, peer, model, bodies, count, logs)
                if run["rows"] != count:
                    raise RuntimeError(f"{name}: {run['rows']} rows for {count} tasks")
                rates[name].append(run["tasks_per_s"])
                if run["tasks_per_s"]:
                    cpu_ms[name].append(round(run["cpu_cores_workers"] / run["tasks_per_s"] * 1000, 2))
    finally:
        await env.close()
    before = statistics.median(r for r in rates["before"] if r is not None)
    after = statistics.median(r for r in rates["after"] if r is not None)
    return {
        "setting": "2 replicas, max batch 16, wait 20 ms, intra-op threads 1",
        "tasks": count,
        "tasks_per_s": rates,
        "before_median": round(before, 1),
        "after_median": round(after, 1),
        "after_over_before": round(after / before, 3),
        "worker_cpu_ms_per_task": cpu_ms,
        "worker_cpu_ms_per_task_median": {k: statistics.median(v) for k, v in cpu_ms.items() if v},
    }


# ---- the run ---------------------------------------------------------------------------------------------


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", default="main", help="git revision of the code before (default: main)")
    parser.add_argument("--frames", type=int, default=100, help="distinct frames (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="decode rounds (default: %(default)s)")
    parser.add_argument(
        "--tasks", type=int, default=1500, help="backlog per fleet run (default: %(default)s)"
    )
    parser.add_argument("--fleet-rounds", type=int, default=3, help="fleet rounds (default: %(default)s)")
    parser.add_argument("--skip-fleet", action="store_true", help="no end-to-end runs")
    return parser.parse_args()


def main() -> None:
    arguments = _arguments()
    model = shipped_model_path()
    detector = load_detector(DetectorConfig(model_path=model, device="cpu"))
    bodies = make_frames(arguments.frames)
    result: dict[str, Any] = {"model": model.name}
    result["decode_letterbox"] = decode_letterbox(bodies, detector.info.input_size, arguments.rounds)
    print("decode + letterbox:", result["decode_letterbox"], flush=True)
    result["accuracy"] = held_out_accuracy(detector)
    print("held-out accuracy:", result["accuracy"], flush=True)
    if not arguments.skip_fleet:
        with tempfile.TemporaryDirectory() as scratch:
            tree, logs = Path(scratch) / "before", Path(scratch) / "logs"
            tree.mkdir()
            logs.mkdir()
            result["before_commit"] = export_tree(arguments.before, tree)
            result["fleet"] = asyncio.run(
                fleet(model, tree, bodies, arguments.tasks, arguments.fleet_rounds, logs)
            )
        print("fleet:", result["fleet"], flush=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
