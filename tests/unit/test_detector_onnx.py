"""The ONNX Runtime detector end to end, on tiny models built into tmp_path."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumer.detector import (
    DecodedFrame,
    Detection,
    Detector,
    DetectorConfig,
    InferenceError,
    ModelLoadError,
    load_detector,
)
from consumer.detector.preprocess import Letterbox
from shared.errors import DetfleetError
from tests.support.onnx_graphs import (
    CanvasBox,
    Layout,
    write_bright_square_model,
    write_end_to_end_model,
    write_failing_model,
    write_yolo_head_model,
)

SOURCES = [(640, 640), (1280, 720), (480, 640), (333, 197), (64, 64)]


def full_scale(images: Sequence[np.ndarray]) -> list[DecodedFrame]:
    """Arrays as frames decoded at full scale, their own size the source size."""
    return [DecodedFrame.of(image) for image in images]


def load(path: Path, **settings: Any) -> Detector:
    return load_detector(DetectorConfig(model_path=path, device=settings.pop("device", "cpu"), **settings))


def white_square(
    width: int, height: int, box: tuple[int, int, int, int], dtype: Any = np.uint8
) -> np.ndarray:
    """A black BGR image with a white rectangle at box (x1, y1, x2, y2, exclusive ends)."""
    image = np.zeros((height, width, 3), dtype)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = np.iinfo(dtype).max
    return image


def square_for(index: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A different, well-inside rectangle per index: large enough to survive downscaling to the canvas."""
    x1, y1 = width * (1 + index % 3) // 8, height * (1 + index % 2) // 8
    return x1, y1, x1 + width // 3, y1 + height // 3


# ---- known outputs in both layouts ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["head", "end_to_end"])
@pytest.mark.parametrize("source", SOURCES)
def test_known_canvas_boxes_come_back_in_source_pixels(
    tmp_path: Path, layout: str, source: tuple[int, int]
) -> None:
    width, height = source
    placement = Letterbox.fit(source, (320, 256))
    wanted = np.array([[0.1 * width, 0.2 * height, 0.5 * width, 0.9 * height], [0, 0, width, height]])
    canvas = placement.to_canvas(wanted)
    boxes = [CanvasBox.at(canvas[0], 0.9, 1), CanvasBox.at(canvas[1], 0.6, 0)]
    write = write_yolo_head_model if layout == "head" else write_end_to_end_model
    model = write(tmp_path / "m.onnx", boxes, input_size=(320, 256), names=["part", "scratch"])

    [detections] = load(model).detect(full_scale([np.zeros((height, width, 3), np.uint8)]))

    assert [(d.class_id, d.label) for d in detections] == [(1, "scratch"), (0, "part")]
    assert [d.score for d in detections] == pytest.approx([0.9, 0.6])
    for detection, box in zip(detections, wanted, strict=True):
        assert detection.box == pytest.approx(tuple(box), abs=0.5)


def test_nms_thresholds_and_limits_apply_through_the_model(tmp_path: Path) -> None:
    boxes = [
        CanvasBox(100, 100, 200, 200, 0.9, 0),
        CanvasBox(102, 101, 201, 199, 0.85, 0),  # same class, overlapping: suppressed
        CanvasBox(101, 100, 200, 200, 0.8, 1),  # other class: kept
        CanvasBox(400, 400, 450, 450, 0.5, 0),
        CanvasBox(500, 500, 550, 550, 0.3, 0),  # under confidence 0.4
    ]
    model = write_yolo_head_model(tmp_path / "m.onnx", boxes, anchors=8)
    [found] = load(model, confidence=0.4).detect(full_scale([np.zeros((640, 640, 3), np.uint8)]))
    assert [(d.class_id, round(d.score, 2)) for d in found] == [(0, 0.9), (1, 0.8), (0, 0.5)]
    [limited] = load(model, confidence=0.4, max_detections=2).detect(
        full_scale([np.zeros((640, 640, 3), np.uint8)])
    )
    assert [round(d.score, 2) for d in limited] == [0.9, 0.8]


# ---- outputs that follow the picture -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["head", "end_to_end"])
def test_a_white_square_is_found_where_it_was_drawn(tmp_path: Path, layout: Layout) -> None:
    model = write_bright_square_model(
        tmp_path / "m.onnx", layout=layout, class_id=1, names=["part", "scratch"]
    )
    detector = load(model)
    images = [white_square(w, h, square_for(i, w, h)) for i, (w, h) in enumerate(SOURCES)]
    results = detector.detect(full_scale(images))
    for (width, height), image_index, detections in zip(SOURCES, range(len(SOURCES)), results, strict=True):
        [detection] = detections
        # one canvas pixel of resampling blur, seen from the source side
        tolerance = 1.5 / min(640 / width, 640 / height)
        assert detection.box == pytest.approx(square_for(image_index, width, height), abs=max(tolerance, 1.0))
        assert detection.label == "scratch"
        assert detection.score == pytest.approx(0.9)


def test_an_image_without_a_square_gets_no_detection(tmp_path: Path) -> None:
    detector = load(write_bright_square_model(tmp_path / "m.onnx"))
    assert detector.detect(
        full_scale([np.zeros((100, 100, 3), np.uint8), np.full((100, 100, 3), 200, np.uint8)])
    ) == [
        [],
        [],
    ]


def test_fixed_batch_and_dynamic_models_agree_on_a_batch_of_five(tmp_path: Path) -> None:
    fixed = load(write_bright_square_model(tmp_path / "fixed.onnx", dynamic_batch=False))
    dynamic = load(write_bright_square_model(tmp_path / "dynamic.onnx", dynamic_batch=True))
    assert (fixed.info.batch_size, dynamic.info.batch_size) == (1, None)
    images = [white_square(w, h, square_for(i, w, h)) for i, (w, h) in enumerate(SOURCES)]
    from_fixed, from_dynamic = fixed.detect(full_scale(images)), dynamic.detect(full_scale(images))
    assert len(from_fixed) == 5
    assert all(len(found) == 1 for found in from_fixed)
    assert from_fixed == from_dynamic


def test_a_fixed_batch_of_two_pads_the_last_chunk(tmp_path: Path) -> None:
    write_end_to_end_model(
        tmp_path / "m.onnx", [CanvasBox(0, 0, 64, 64, 0.9, 0)], rows=4, input_size=(64, 64)
    )
    model = tmp_path / "two.onnx"
    _with_batch_dim(tmp_path / "m.onnx", model, 2)
    detector = load(model)
    assert detector.info.batch_size == 2
    found = detector.detect(full_scale([np.zeros((32, 32, 3), np.uint8)] * 3))
    assert [len(d) for d in found] == [1, 1, 1]


def _with_batch_dim(source: Path, target: Path, batch: int) -> None:
    import onnx

    model = onnx.load(str(source))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(target))


def test_grey_rgba_and_16_bit_images_share_one_batch(tmp_path: Path) -> None:
    detector = load(write_bright_square_model(tmp_path / "m.onnx"))
    box = (20, 30, 60, 90)
    colour = white_square(100, 120, box)
    grey = colour[:, :, 0].copy()
    rgba = np.dstack([colour, np.zeros((120, 100), np.uint8)])  # transparent: alpha must not matter
    deep = white_square(100, 120, box, np.uint16)
    deep_grey = deep[:, :, 0].copy()
    results = detector.detect(full_scale([grey, rgba, deep, deep_grey, colour]))
    for detections in results:
        assert [d.box for d in detections] == [pytest.approx(box, abs=1.0)]


# ---- model information and class names -----------------------------------------------------------------


def test_model_info_describes_the_file_and_the_session(tmp_path: Path) -> None:
    model = write_yolo_head_model(
        tmp_path / "tiny.onnx", num_classes=3, input_size=(320, 192), names=["a", "b", "c"]
    )
    info = load(model).info
    assert info.name == "tiny.onnx"
    assert info.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    assert info.provider == "CPUExecutionProvider"
    assert info.class_names == ("a", "b", "c")
    assert info.input_size == (320, 192)
    assert info.batch_size is None


def test_the_provider_choice_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = write_yolo_head_model(tmp_path / "m.onnx")
    with caplog.at_level(logging.INFO, logger="consumer.detector"):
        detector = load(model, device="auto")
        detector.detect(full_scale([np.zeros((8, 8, 3), np.uint8)]))
    lines = [r.getMessage() for r in caplog.records if "runs on" in r.getMessage()]
    assert len(lines) == 1
    assert detector.info.provider in lines[0]
    assert detector.info.provider in {"CUDAExecutionProvider", "CPUExecutionProvider"}


def test_cuda_is_either_really_used_or_refused(tmp_path: Path) -> None:
    """device=cuda must never run on the CPU silently; onnxruntime-gpu accepts the request without a GPU."""
    model = write_yolo_head_model(tmp_path / "m.onnx")
    cuda_works = "CUDAExecutionProvider" in load(model, device="auto").info.provider
    if cuda_works:
        assert load(model, device="cuda").info.provider == "CUDAExecutionProvider"
    else:
        with pytest.raises(ModelLoadError, match="on CUDA") as raised:
            load(model, device="cuda")
        assert str(model) in str(raised.value)


def test_names_can_be_a_list_or_a_sparse_dict(tmp_path: Path) -> None:
    as_list = write_yolo_head_model(tmp_path / "a.onnx", metadata={"names": "['part', 'scratch']"})
    sparse = write_yolo_head_model(
        tmp_path / "b.onnx", num_classes=3, metadata={"names": "{0: 'part', 2: 'dent'}"}
    )
    assert load(as_list).info.class_names == ("part", "scratch")
    assert load(sparse).info.class_names == ("part", "class1", "dent")


def test_a_labels_file_gives_the_names(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("person\n\nbicycle \n", encoding="utf-8")
    model = write_yolo_head_model(tmp_path / "m.onnx", [CanvasBox(0, 0, 9, 9, 0.9, 1)], names=["x", "y"])
    detector = load(model, labels_path=labels)
    assert detector.info.class_names == ("person", "bicycle")
    assert detector.detect(full_scale([np.zeros((640, 640, 3), np.uint8)]))[0][0].label == "bicycle"


def test_without_names_the_classes_are_numbered(tmp_path: Path) -> None:
    model = write_yolo_head_model(tmp_path / "m.onnx", [CanvasBox(0, 0, 9, 9, 0.9, 2)], num_classes=3)
    detector = load(model)
    assert detector.info.class_names == ("class0", "class1", "class2")
    assert detector.detect(full_scale([np.zeros((64, 64, 3), np.uint8)]))[0][0].label == "class2"


def test_imgsz_metadata_sizes_a_model_with_a_dynamic_input(tmp_path: Path) -> None:
    model = write_yolo_head_model(tmp_path / "m.onnx", input_size=(320, 256), dynamic_size=True)
    assert load(model).info.input_size == (320, 256)  # ultralytics writes imgsz as [height, width]


@pytest.mark.parametrize(
    "names",
    [
        "__import__('pathlib').Path('{marker}').touch()",
        "{{0: __import__('pathlib').Path('{marker}').touch()}}",
        "[n for n in ().__class__.__bases__[0].__subclasses__()]",
        "{{0: 'part', 'x': 'scratch'}}",
        "'just a string'",
    ],
)
def test_names_that_are_not_a_plain_literal_are_refused_not_run(tmp_path: Path, names: str) -> None:
    marker = tmp_path / "executed"
    model = write_yolo_head_model(tmp_path / "m.onnx", metadata={"names": names.format(marker=marker)})
    with pytest.raises(ModelLoadError, match="names") as raised:
        load(model)
    assert str(model) in str(raised.value)
    assert not marker.exists()


def test_a_missing_model_is_a_readable_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.onnx"
    with pytest.raises(DetfleetError) as raised:
        load(missing)
    message = str(raised.value)
    assert str(missing) in message
    assert "\n" not in message


def test_a_corrupt_model_is_a_readable_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ModelLoadError) as raised:
        load(corrupt)
    assert str(raised.value).startswith(f"cannot load model {corrupt}")
    assert "\n" not in str(raised.value)


# ---- failures while running ----------------------------------------------------------------------------


def test_a_runtime_failure_raises_inference_error_for_the_whole_batch(tmp_path: Path) -> None:
    detector = load(write_failing_model(tmp_path / "m.onnx"))
    clean = np.zeros((32, 32, 3), np.uint8)
    assert detector.detect(full_scale([clean, clean])) == [[], []]
    with pytest.raises(InferenceError) as raised:
        detector.detect(full_scale([clean, np.full((32, 32, 3), 255, np.uint8), clean]))
    assert isinstance(raised.value, DetfleetError)
    assert "m.onnx" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_an_empty_batch_needs_no_run(tmp_path: Path) -> None:
    detector = load(write_failing_model(tmp_path / "m.onnx"))
    assert detector.detect(full_scale([])) == []


def test_detections_serialise_to_plain_json(tmp_path: Path) -> None:
    detection = Detection(1, "scratch", 0.5, (1.0, 2.0, 3.0, 4.0))
    assert detection.to_json() == {
        "class_id": 1,
        "label": "scratch",
        "score": 0.5,
        "box": [1.0, 2.0, 3.0, 4.0],
    }
