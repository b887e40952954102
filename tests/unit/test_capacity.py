"""The capacity model and ``detfleet plan``: the arithmetic, the knees, bad input, and docs/scaling.md
holding the tables the model renders."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from detfleet import capacity
from detfleet.cli import main as cli_main

SCALING_DOC = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"


def test_the_work_grows_with_cameras_and_fps() -> None:
    small, large = capacity.plan(100, 5.0), capacity.plan(10_000, 5.0)
    assert small.frames_per_s == 500
    assert large.frames_per_s == 50_000
    assert large.cores_cpu > small.cores_cpu
    assert large.gpus >= small.gpus >= 1
    assert large.broker_cores == pytest.approx(100 * small.broker_cores, rel=0.02)


def test_cores_follow_the_measured_cost_at_the_headroom() -> None:
    p = capacity.plan(100, 10.0, frame_kb=60.0)
    stages = p.cpu_ms_per_frame
    per_frame_ms = stages["decode"] + stages["letterbox"] + stages["inference"] + stages["worker_overhead"]
    busy_cores = 1_000 * per_frame_ms / 1000
    assert p.cores_cpu == max(1, math.ceil(busy_cores / capacity.HEADROOM))
    assert p.replicas_cpu == p.cores_cpu


def test_gpus_take_inference_off_the_cores() -> None:
    p = capacity.plan(1_000, 10.0)
    assert p.cores_with_gpus < p.cores_cpu
    assert p.gpus == max(1, math.ceil(10_000 / (capacity.GPU_IMAGES_PER_S * capacity.HEADROOM)))


def test_large_frames_are_claim_checked_and_weigh_little_on_the_broker() -> None:
    small = capacity.plan(100, 5.0, frame_kb=60.0)
    large = capacity.plan(100, 5.0, frame_kb=2_000.0)
    assert not small.claim_check
    assert large.claim_check
    assert large.message_kb == capacity.CLAIM_CHECK_MESSAGE_KB
    assert large.broker_cores <= small.broker_cores
    assert any("claim-check" in note for note in large.notes)


def test_with_a_gpu_decoding_comes_before_inference_and_the_knees_are_in_order() -> None:
    knees = capacity.bottlenecks(60.0, gpu=True)
    names = [name for name, _ in knees]
    assert names.index(f"{capacity.GPU_REPLICA_CORES} decoding cores beside a GPU") < names.index("one GPU")
    assert [fps for _, fps in knees] == sorted(fps for _, fps in knees)
    assert capacity.bottlenecks(60.0, gpu=False)[0][0] == "one core, CPU inference"


@pytest.mark.parametrize(
    ("cameras", "fps", "frame_kb"), [(0, 5.0, 60.0), (10, 0.0, 60.0), (10, 5.0, 0.0), (10, 5000.0, 60.0)]
)
def test_impossible_inputs_are_refused(cameras: int, fps: float, frame_kb: float) -> None:
    with pytest.raises(capacity.PlanError):
        capacity.plan(cameras, fps, frame_kb)


def test_plan_prints_the_model_answer(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "--cameras", "1000", "--fps", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1,000 cameras x 5 fps = 5,000 frames/s")
    assert f"{capacity.plan(1_000, 5.0).replicas_cpu:,} replicas" in out


def test_plan_json_is_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "--cameras", "20", "--fps", "2.5", "--frame-kb", "17", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(capacity.plan(20, 2.5, 17).as_dict()))


@pytest.mark.parametrize(
    "argv",
    [
        ["--cameras", "0", "--fps", "5"],
        ["--cameras", "ten", "--fps", "5"],
        ["--fps", "5"],
        ["--cameras", "10", "--fps", "5", "--frame-kb", "-1"],
        ["--cameras", "10", "--fps", "5", "--gpu-images-per-s", "0"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("detfleet plan: error: ")


def test_the_scaling_doc_holds_the_model_tables() -> None:
    """docs/scaling.md's generated blocks are what detfleet/capacity.py renders now
    (python -m detfleet.capacity rewrites them)."""
    text = SCALING_DOC.read_text()
    for name, lines in capacity.docs_tables().items():
        block = re.search(rf"<!-- capacity:{name} -->\n(.*?)\n<!-- /capacity:{name} -->", text, re.DOTALL)
        assert block is not None, name
        assert block.group(1) == "\n".join(lines), name
