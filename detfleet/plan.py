"""``detfleet plan``: how many replicas, cores, GPUs, broker nodes and queues a plant needs.

    detfleet plan --cameras 1000 --fps 5 [--frame-kb 60] [--gpu-images-per-s 2000] [--json]

The answer comes from detfleet/capacity.py, the same model docs/scaling.md shows; a bad value is one line
on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from detfleet import capacity
from shared.errors import DetfleetError


class PlanUsageError(DetfleetError):
    """A bad argument to ``detfleet plan`` (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises one line instead of printing its usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise PlanUsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="detfleet plan", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cameras", type=int, required=True, help="cameras in the plant")
    parser.add_argument("--fps", type=float, required=True, help="frames per second each camera sends")
    parser.add_argument(
        "--frame-kb", type=float, default=capacity.DEFAULT_FRAME_KB, help="JPEG size of a frame, KB"
    )
    parser.add_argument(
        "--gpu-images-per-s",
        type=float,
        default=capacity.GPU_IMAGES_PER_S,
        help="images per second one GPU infers (an assumption: docs/scaling.md)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return parser


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if args.gpu_images_per_s <= 0:
        raise PlanUsageError(f"--gpu-images-per-s must be above 0, got {args.gpu_images_per_s:g}")
    try:
        answer = capacity.plan(args.cameras, args.fps, args.frame_kb, args.gpu_images_per_s)
    except capacity.PlanError as error:
        raise PlanUsageError(str(error)) from None
    if args.json:
        print(json.dumps(answer.as_dict()))
    else:
        print(capacity.render(answer), file=sys.stdout)
    return 0
