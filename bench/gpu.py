"""The compute-bound model on a GPU: PyTorch on CUDA against ONNX Runtime on the CPU, and the pre-processing.

Meant for a GPU machine with CUDA 13, PyTorch (with CUDA) and onnxruntime (the CPU build) but no network.
It needs nothing else: no detfleet install, no onnx package, no broker or database. The compute-bound
graph of tests/support/onnx_graphs.py (write_compute_bound_model: 3x3 convolutions, stride 2 to 32, two per
stage, width 24, 1x1 heads at strides 8/16/32 concatenated into a YOLOv8-shaped [B, 84, 8400] head, about
7.7 GFLOPs an image at 640x640) is rebuilt here layer for layer in PyTorch with random weights, and:

1. PyTorch CUDA, fp32 and fp16 (autocast), channels-last, at batch 1, 8, 16, 32, 64: images/s of the model
   alone on a tensor already on the GPU, and with the host-to-device copy of a pinned batch;
2. the letterbox of 640x480 frames into 640x640 on the GPU (uint8 upload, resize, pad, scale) against
   OpenCV on the CPU, when OpenCV is there;
3. the same graph exported to ONNX by torch.onnx and run by ONNX Runtime on the CPU at batch 1 and 8, for
   the GPU-over-CPU ratio (skipped where torch.onnx cannot export without the onnx package).

Copy this one file to the GPU machine and run it:

    python gpu.py --out gpu.json        # about two minutes; prints a table, writes JSON

then paste the JSON's "summary" lines into docs/performance.md under "GPU". Wheels: none are needed
beyond torch and onnxruntime; if torch.onnx needs the onnx package to export, bring its wheel (about
17 MB) with ``pip install --no-index onnx-*.whl`` (well under the 64 MiB allowed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

WIDTH = 24  # write_compute_bound_model's width: 7.7 GFLOPs at 640x640
CLASSES = 80
BATCHES = (1, 8, 16, 32, 64)


class ComputeBound(nn.Module):
    """write_conv_head_model(width=24) in PyTorch: the same layers, shapes and head layout."""

    def __init__(self, width: int = WIDTH, classes: int = CLASSES) -> None:
        super().__init__()
        stages, heads, channels = [], [], 3
        for stage in range(5):
            out = width * 2**stage
            stages.append(
                nn.Sequential(
                    nn.Conv2d(channels, out, 3, 2, 1), nn.ReLU(), nn.Conv2d(out, out, 3, 1, 1), nn.ReLU()
                )
            )
            if stage >= 2:
                heads.append(nn.Conv2d(out, 4 + classes, 1))
            channels = out
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows, feature = [], images
        for index, stage in enumerate(self.stages):
            feature = stage(feature)
            if index >= 2:
                head = self.heads[index - 2](feature)
                rows.append(head.flatten(2))
        return torch.sigmoid(torch.cat(rows, dim=2))


def gflops(width: int = WIDTH) -> float:
    side, channels, flops = 640, 3, 0
    for stage in range(5):
        out = width * 2**stage
        side //= 2
        flops += 2 * 9 * (channels + out) * out * side * side
        if stage >= 2:
            flops += 2 * out * (4 + CLASSES) * side * side
        channels = out
    return flops / 1e9


def timed(run: Callable[[], Any], images: int, seconds: float, sync: bool) -> float:
    """Images per second of run() (one batch of ``images``), after two warm-up calls."""
    for _ in range(2):
        run()
    if sync:
        torch.cuda.synchronize()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done == 0:
        run()
        done += images
    if sync:
        torch.cuda.synchronize()
    return round(done / (time.perf_counter() - started), 1)


def torch_cuda(model: nn.Module, seconds: float) -> dict[str, Any]:
    device = torch.device("cuda")
    model = model.to(device).eval()
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for batch in BATCHES:
            on_gpu = torch.rand(batch, 3, 640, 640, device=device).to(memory_format=torch.channels_last)
            pinned = torch.rand(batch, 3, 640, 640).pin_memory()

            def fp32(x: torch.Tensor = on_gpu) -> Any:
                return model(x)

            def fp16(x: torch.Tensor = on_gpu) -> Any:
                with torch.autocast("cuda", dtype=torch.float16):
                    return model(x)

            def fp16_with_copy(x: torch.Tensor = pinned) -> Any:
                with torch.autocast("cuda", dtype=torch.float16):
                    return model(x.to(device, non_blocking=True).to(memory_format=torch.channels_last))

            out[str(batch)] = {
                "fp32": timed(fp32, batch, seconds, True),
                "fp16": timed(fp16, batch, seconds, True),
                "fp16_with_h2d_copy": timed(fp16_with_copy, batch, seconds, True),
            }
    return out


def letterbox(seconds: float) -> dict[str, Any]:
    """640x480 uint8 frames to a 640x640 float batch of 32: on the GPU, and with OpenCV on the CPU."""
    frames = np.random.default_rng(0).integers(0, 256, (32, 480, 640, 3), dtype=np.uint8)
    device = torch.device("cuda")
    host = torch.from_numpy(frames).pin_memory()

    def on_gpu() -> torch.Tensor:
        batch = host.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        return torch.nn.functional.pad(batch.flip(1), (0, 0, 80, 80), value=114 / 255)

    out = {"gpu_images_per_s": timed(on_gpu, len(frames), seconds, True)}
    try:
        import cv2
    except ImportError:
        return out

    def on_cpu() -> list[np.ndarray]:
        return [
            cv2.copyMakeBorder(f, 80, 80, 0, 0, cv2.BORDER_CONSTANT, value=(114, 114, 114)).astype(np.float32)
            / 255
            for f in frames
        ]

    out["cpu_opencv_images_per_s"] = timed(on_cpu, len(frames), seconds, False)
    return out


def onnx_runtime_cpu(model: nn.Module, seconds: float) -> dict[str, Any]:
    try:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "compute-bound.onnx"
            sample = torch.rand(1, 3, 640, 640)
            torch.onnx.export(
                model.cpu().eval(), (sample,), str(path), input_names=["images"], output_names=["output0"],
                dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}}, dynamo=False,
            )  # fmt: skip
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            out = {}
            for batch in (1, 8):
                blob = np.random.default_rng(0).random((batch, 3, 640, 640), dtype=np.float32)
                out[str(batch)] = timed(_runner(session, blob), batch, seconds, False)
            return {"images_per_s": out, "cpu_cores": os.cpu_count()}
    except Exception as error:  # an export or runtime gap on that machine is reported, not fatal
        return {"skipped": f"{type(error).__name__}: {error}"}


def _runner(session: Any, blob: np.ndarray) -> Callable[[], Any]:
    return lambda: session.run(None, {"images": blob})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to PyTorch")
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = ComputeBound()
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "model_gflops": round(gflops(), 2),
        "torch_cuda_images_per_s": torch_cuda(model, args.seconds),
        "letterbox": letterbox(args.seconds),
    }
    result["onnx_runtime_cpu"] = onnx_runtime_cpu(model, args.seconds)
    best = max(
        (
            (batch, mode, rate)
            for batch, modes in result["torch_cuda_images_per_s"].items()
            for mode, rate in modes.items()
        ),
        key=lambda item: item[2],
    )
    result["summary"] = [
        f"{result['gpu']}, torch {result['torch']} CUDA {result['cuda']}: compute-bound model"
        f" ({result['model_gflops']} GFLOPs) best {best[2]} img/s at batch {best[0]} ({best[1]})",
        f"letterbox on GPU {result['letterbox']['gpu_images_per_s']} img/s,"
        f" OpenCV CPU {result['letterbox'].get('cpu_opencv_images_per_s', '-')} img/s",
        f"ONNX Runtime CPU: {result['onnx_runtime_cpu']}",
    ]
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
