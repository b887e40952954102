"""Tiny ONNX detection models built with the onnx helper API, for tests and benchmarks.

Every model takes one input "images" [B, 3, H, W] float32 (RGB in [0, 1], as the detector feeds it) and has
one output "output0" in either layout the detector reads:

- "head": the YOLOv8/YOLO11 head [B, 4 + classes, N], rows cx, cy, w, h, then one score per class;
- "end_to_end": [B, K, 6], rows x1, y1, x2, y2, score, class.

All boxes are in model-canvas pixels (the letterboxed input), as a real model emits them. The batch dim is
1 (fixed, as ultralytics exports by default) or the symbol "batch" (dynamic). Metadata follows ultralytics:
"names" is a Python dict literal such as "{0: 'part', 1: 'scratch'}" and "imgsz" is "[height, width]".

Builders:
- write_constant_model / write_yolo_head_model / write_end_to_end_model: the same known boxes for every image.
- write_bright_square_model: one box around the near-white pixels of each image, so the output follows the
  picture (draw a white rectangle, get its box back through the letterbox).
- write_failing_model: no detections, but ONNX Runtime fails the run when any pixel of the batch is white.
- write_conv_head_model: random-weight convolutions ending in a YOLOv8-shaped head, for speed measurements.
- write_compute_bound_model: the same graph widened to about 8 GFLOPs an image at 640x640 (YOLOv8n is 8.7).
- conv_gflops: the convolution FLOPs of one image through a model (2 per multiply-add, as ultralytics counts).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, TypedDict, Unpack

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

Layout = Literal["head", "end_to_end"]
OPSET = 17
IR_VERSION = 8  # readable by every ONNX Runtime the project supports
INPUT = "images"
OUTPUT = "output0"
BRIGHT = 0.9  # a pixel counts as bright when all three channels exceed this (the grey padding is 0.447)


class ModelOptions(TypedDict, total=False):
    """The keyword options of write_constant_model, shared by the wrappers around it."""

    input_size: tuple[int, int]  # (width, height)
    dynamic_batch: bool
    names: Sequence[str] | None
    metadata: Mapping[str, str] | None  # extra or overriding metadata_props
    dynamic_size: bool  # height and width symbolic in the graph, as with ultralytics dynamic=True


class CanvasBox(NamedTuple):
    """A box as the model emits it, in canvas (model input) pixels."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    class_id: int

    @classmethod
    def at(cls, corners: Sequence[float], score: float, class_id: int) -> CanvasBox:
        """A box from any four corner values (x1, y1, x2, y2), e.g. a row of a numpy array."""
        x1, y1, x2, y2 = (float(value) for value in corners)
        return cls(x1, y1, x2, y2, score, class_id)


# ---- known outputs -------------------------------------------------------------------------------------


def head_tensor(boxes: Sequence[CanvasBox], num_classes: int, anchors: int) -> np.ndarray:
    """One image's [4 + num_classes, anchors] head output holding boxes in its first anchors, zeros after."""
    if len(boxes) > anchors:
        raise ValueError(f"{len(boxes)} boxes do not fit in {anchors} anchors")
    tensor = np.zeros((4 + num_classes, anchors), np.float32)
    for anchor, box in enumerate(boxes):
        centre = ((box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2, box.x2 - box.x1, box.y2 - box.y1)
        tensor[:4, anchor] = centre
        tensor[4 + box.class_id, anchor] = box.score
    return tensor


def end_to_end_tensor(boxes: Sequence[CanvasBox], rows: int) -> np.ndarray:
    """One image's [rows, 6] end-to-end output holding boxes in its first rows, zeros after."""
    if len(boxes) > rows:
        raise ValueError(f"{len(boxes)} boxes do not fit in {rows} rows")
    tensor = np.zeros((rows, 6), np.float32)
    if boxes:
        tensor[: len(boxes)] = np.array(boxes, np.float32)
    return tensor


def write_constant_model(
    path: Path,
    output: np.ndarray,
    *,
    input_size: tuple[int, int] = (640, 640),
    dynamic_batch: bool = True,
    names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    dynamic_size: bool = False,
) -> Path:
    """A model whose output for every image is output (one image's 2-D tensor). The output still depends on
    the input through a multiply by zero, so the runtime cannot fold it away and the batch dim follows B."""
    nodes = [
        helper.make_node("ReduceMean", [INPUT], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Reshape", ["mean", "per_image"], ["mean_3d"]),
        helper.make_node("Mul", ["mean_3d", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "known"], [OUTPUT]),
    ]
    constants: dict[str, np.ndarray] = {
        "per_image": np.array([-1, 1, 1], np.int64),
        "zero": np.zeros((), np.float32),
        "known": output[None].astype(np.float32),
    }
    graph = _graph(nodes, constants, input_size, dynamic_batch, dynamic_size, output.shape)
    return _save(path, graph, names, input_size, metadata)


def write_yolo_head_model(
    path: Path,
    boxes: Sequence[CanvasBox] = (),
    *,
    num_classes: int = 2,
    anchors: int = 32,
    **options: Unpack[ModelOptions],
) -> Path:
    """A YOLOv8-head model [B, 4 + num_classes, anchors] emitting boxes for every image."""
    return write_constant_model(path, head_tensor(boxes, num_classes, anchors), **options)


def write_end_to_end_model(
    path: Path, boxes: Sequence[CanvasBox] = (), *, rows: int = 300, **options: Unpack[ModelOptions]
) -> Path:
    """An end-to-end model [B, rows, 6] emitting boxes for every image."""
    return write_constant_model(path, end_to_end_tensor(boxes, rows), **options)


# ---- outputs that follow the picture -------------------------------------------------------------------


def write_bright_square_model(
    path: Path,
    *,
    layout: Layout = "head",
    num_classes: int = 2,
    class_id: int = 0,
    score: float = 0.9,
    anchors: int = 16,
    input_size: tuple[int, int] = (640, 640),
    dynamic_batch: bool = True,
    names: Sequence[str] | None = None,
) -> Path:
    """A model that boxes the near-white pixels of each image: one box (x1, y1, x2 + 1, y2 + 1 of the bright
    pixels, canvas pixels) with class_id and score; an image with no bright pixel gets score 0."""
    nodes = [
        helper.make_node("ReduceMin", [INPUT], ["darkest_channel"], axes=[1], keepdims=0),
        helper.make_node("Greater", ["darkest_channel", "bright"], ["is_bright"]),
        helper.make_node("Cast", ["is_bright"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["mask"], ["bright_rows"], axes=[2], keepdims=0),
        helper.make_node("ReduceMax", ["mask"], ["bright_columns"], axes=[1], keepdims=0),
        helper.make_node("ReduceMax", ["bright_rows"], ["found"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["found", "score"], ["box_score"]),
        *_first_and_last("bright_columns", "x1", "x2"),
        *_first_and_last("bright_rows", "y1", "y2"),
    ]
    constants: dict[str, np.ndarray] = {
        "bright": np.array(BRIGHT, np.float32),
        "score": np.array(score, np.float32),
        "one": np.array(1, np.float32),
    }
    if layout == "head":
        nodes += _head_rows(num_classes, class_id, anchors, constants)
        shape: tuple[int, ...] = (4 + num_classes, anchors)
    else:
        nodes += _end_to_end_rows(class_id, anchors, constants)
        shape = (anchors, 6)
    graph = _graph(nodes, constants, input_size, dynamic_batch, False, shape)
    return _save(path, graph, names, input_size, None)


def _first_and_last(presence: str, first: str, last: str) -> list[onnx.NodeProto]:
    """first = index of the first 1 in presence [B, L]; last = index of the last 1, plus one; both [B, 1]."""
    return [
        helper.make_node("ArgMax", [presence], [f"{first}_index"], axis=1, keepdims=1),
        helper.make_node("ArgMax", [presence], [f"{last}_index"], axis=1, keepdims=1, select_last_index=1),
        helper.make_node("Cast", [f"{first}_index"], [first], to=TensorProto.FLOAT),
        helper.make_node("Cast", [f"{last}_index"], [f"{last}_inner"], to=TensorProto.FLOAT),
        helper.make_node("Add", [f"{last}_inner", "one"], [last]),
    ]


def _head_rows(
    num_classes: int, class_id: int, anchors: int, constants: dict[str, np.ndarray]
) -> list[onnx.NodeProto]:
    constants["half"] = np.array(0.5, np.float32)
    constants["one_hot"] = np.eye(num_classes, dtype=np.float32)[class_id][None]
    constants["head_pads"] = np.array([0, 0, 0, 0, 0, anchors - 1], np.int64)
    constants["anchor_axis"] = np.array([2], np.int64)
    return [
        helper.make_node("Add", ["x1", "x2"], ["x_sum"]),
        helper.make_node("Mul", ["x_sum", "half"], ["cx"]),
        helper.make_node("Add", ["y1", "y2"], ["y_sum"]),
        helper.make_node("Mul", ["y_sum", "half"], ["cy"]),
        helper.make_node("Sub", ["x2", "x1"], ["w"]),
        helper.make_node("Sub", ["y2", "y1"], ["h"]),
        helper.make_node("Mul", ["box_score", "one_hot"], ["class_scores"]),
        helper.make_node("Concat", ["cx", "cy", "w", "h", "class_scores"], ["anchor0"], axis=1),
        helper.make_node("Unsqueeze", ["anchor0", "anchor_axis"], ["anchor0_3d"]),
        helper.make_node("Pad", ["anchor0_3d", "head_pads"], [OUTPUT]),
    ]


def _end_to_end_rows(class_id: int, rows: int, constants: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    constants["zero_f"] = np.array(0, np.float32)
    constants["class_value"] = np.array(class_id, np.float32)
    constants["e2e_pads"] = np.array([0, 0, 0, 0, rows - 1, 0], np.int64)
    constants["row_axis"] = np.array([1], np.int64)
    return [
        helper.make_node("Mul", ["found", "zero_f"], ["zeros"]),
        helper.make_node("Add", ["zeros", "class_value"], ["class_column"]),
        helper.make_node("Concat", ["x1", "y1", "x2", "y2", "box_score", "class_column"], ["row0"], axis=1),
        helper.make_node("Unsqueeze", ["row0", "row_axis"], ["row0_3d"]),
        helper.make_node("Pad", ["row0_3d", "e2e_pads"], [OUTPUT]),
    ]


# ---- a model that fails at run time --------------------------------------------------------------------


def write_failing_model(
    path: Path,
    *,
    num_classes: int = 2,
    anchors: int = 8,
    input_size: tuple[int, int] = (64, 64),
    dynamic_batch: bool = True,
) -> Path:
    """A head model with no detections whose run fails inside ONNX Runtime (a Reshape to one element too
    many) when any pixel of the batch is white: a poison image for inference-error tests."""
    nodes = [
        helper.make_node("ReduceMax", [INPUT], ["brightest"], axes=[0, 1, 2, 3], keepdims=1),
        helper.make_node("Greater", ["brightest", "nearly_white"], ["poisoned"]),
        helper.make_node("Cast", ["poisoned"], ["extra"], to=TensorProto.INT64),
        helper.make_node("Reshape", [INPUT, "flat"], ["pixels"]),
        helper.make_node("Shape", ["pixels"], ["pixel_count"]),
        helper.make_node("Reshape", ["extra", "flat"], ["extra_1d"]),
        helper.make_node("Add", ["pixel_count", "extra_1d"], ["wanted"]),
        helper.make_node("Reshape", ["pixels", "wanted"], ["checked"]),
        helper.make_node("ReduceSum", ["checked"], ["total"], keepdims=1),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("ReduceMean", [INPUT], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Reshape", ["mean", "per_image"], ["mean_3d"]),
        helper.make_node("Mul", ["mean_3d", "nothing"], ["batch_zeros"]),
        helper.make_node("Add", ["batch_zeros", "known"], [OUTPUT]),
    ]
    constants: dict[str, np.ndarray] = {
        "nearly_white": np.array(0.999, np.float32),
        "flat": np.array([-1], np.int64),
        "zero": np.zeros((), np.float32),
        "per_image": np.array([-1, 1, 1], np.int64),
        "known": head_tensor([], num_classes, anchors)[None],
    }
    graph = _graph(nodes, constants, input_size, dynamic_batch, False, (4 + num_classes, anchors))
    return _save(path, graph, None, input_size, None)


# ---- a model with real compute -------------------------------------------------------------------------


def write_conv_head_model(
    path: Path,
    *,
    input_size: tuple[int, int] = (640, 640),
    num_classes: int = 80,
    width: int = 16,
    dynamic_batch: bool = True,
    seed: int = 0,
) -> Path:
    """A small random-weight backbone (3x3 convolutions, stride 2 down to 32, two per stage) with 1x1 heads
    at strides 8, 16 and 32, concatenated into [B, 4 + num_classes, N] as YOLOv8 does (N = 8400 at 640).
    Class scores are biased low so, as with a trained model, few anchors pass the confidence threshold."""
    builder = _ConvBuilder(np.random.default_rng(seed))
    feature, channels, heads = INPUT, 3, []
    for stage in range(5):
        out_channels = width * 2**stage
        feature = builder.conv(feature, channels, out_channels, stride=2)
        feature = builder.conv(feature, out_channels, out_channels, stride=1)
        channels = out_channels
        if stage >= 2:
            heads.append(builder.head(feature, channels, 4 + num_classes))
    builder.finish_head(heads, input_size, num_classes)
    graph = _graph(
        builder.nodes, builder.constants, input_size, dynamic_batch, False, (4 + num_classes, None)
    )
    names = [f"class{i}" for i in range(num_classes)]
    return _save(path, graph, names, input_size, None)


COMPUTE_BOUND_GFLOPS = 8.0


def write_compute_bound_model(
    path: Path,
    *,
    input_size: tuple[int, int] = (640, 640),
    target_gflops: float = COMPUTE_BOUND_GFLOPS,
    seed: int = 0,
) -> Path:
    """write_conv_head_model at the width whose 640x640 cost is nearest target_gflops (about 8 by default:
    width 24, 7.7 GFLOPs), so inference dominates the per-image work as with a real detector."""
    best: tuple[float, int] | None = None
    for width in range(8, 65):
        cost = _conv_head_gflops_at_640(width)
        if best is None or abs(cost - target_gflops) < abs(best[0] - target_gflops):
            best = (cost, width)
    assert best is not None
    return write_conv_head_model(path, input_size=input_size, width=best[1], seed=seed)


def _conv_head_gflops_at_640(width: int) -> float:
    """The FLOPs of write_conv_head_model's convolutions for one 640x640 image, from its layer plan."""
    side, channels, flops = 640, 3, 0
    for stage in range(5):
        out_channels = width * 2**stage
        side //= 2
        flops += 2 * 9 * channels * out_channels * side * side  # the stride-2 conv
        flops += 2 * 9 * out_channels * out_channels * side * side  # the stride-1 conv
        if stage >= 2:
            flops += 2 * out_channels * 84 * side * side  # the 1x1 head, 4 + 80 rows
        channels = out_channels
    return flops / 1e9


def conv_gflops(path: Path) -> float:
    """FLOPs (2 per multiply-add) of every Conv of the model for one image, from inferred output shapes
    (a convolution whose output size is symbolic or unknown counts as 0)."""
    model = shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {
        info.name: [d.dim_value for d in info.type.tensor_type.shape.dim]
        for info in [*model.graph.value_info, *model.graph.output]
    }
    weights = {tensor.name: tensor.dims for tensor in model.graph.initializer}
    flops = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            kernel = int(np.prod(weights.get(node.input[1], [0])))  # out x in/groups x kh x kw
            out_height, out_width = (shapes.get(node.output[0]) or [0, 0, 0, 0])[2:4]
            flops += 2 * kernel * out_height * out_width
    return flops / 1e9


class _ConvBuilder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, np.ndarray] = {}

    def conv(self, source: str, in_channels: int, out_channels: int, stride: int) -> str:
        name = f"conv{len(self.nodes)}"
        fan_in = in_channels * 9
        self.constants[f"{name}_w"] = self.rng.normal(
            0, np.sqrt(2 / fan_in), (out_channels, in_channels, 3, 3)
        )
        self.constants[f"{name}_b"] = np.zeros(out_channels)
        conv = helper.make_node(
            "Conv",
            [source, f"{name}_w", f"{name}_b"],
            [f"{name}_out"],
            pads=[1, 1, 1, 1],
            strides=[stride, stride],
        )
        self.nodes += [conv, helper.make_node("Relu", [f"{name}_out"], [f"{name}_act"])]
        return f"{name}_act"

    def head(self, source: str, in_channels: int, rows: int) -> str:
        name = f"head{len(self.nodes)}"
        self.constants[f"{name}_w"] = self.rng.normal(0, 0.01, (rows, in_channels, 1, 1))
        self.constants[f"{name}_b"] = np.zeros(rows)
        self.constants["rows_shape"] = np.array([0, rows, -1], np.int64)
        self.nodes += [
            helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [f"{name}_out"]),
            helper.make_node("Reshape", [f"{name}_out", "rows_shape"], [f"{name}_rows"]),
        ]
        return f"{name}_rows"

    def finish_head(self, heads: list[str], input_size: tuple[int, int], num_classes: int) -> None:
        width, height = input_size
        box_scale = [width, height, width / 4, height / 4]  # sigmoid outputs to canvas-sized boxes
        self.constants["row_scale"] = np.array(box_scale + [1.0] * num_classes)[None, :, None]
        self.constants["row_bias"] = np.array([0.0] * 4 + [-6.0] * num_classes)[None, :, None]
        self.nodes += [
            helper.make_node("Concat", heads, ["all_rows"], axis=2),
            helper.make_node("Add", ["all_rows", "row_bias"], ["biased"]),
            helper.make_node("Sigmoid", ["biased"], ["unit"]),
            helper.make_node("Mul", ["unit", "row_scale"], [OUTPUT]),
        ]


# ---- shared plumbing -----------------------------------------------------------------------------------


def _graph(
    nodes: Iterable[onnx.NodeProto],
    constants: Mapping[str, np.ndarray],
    input_size: tuple[int, int],
    dynamic_batch: bool,
    dynamic_size: bool,
    per_image_output: tuple[int | None, ...],
) -> onnx.GraphProto:
    width, height = input_size
    batch: int | str = "batch" if dynamic_batch else 1
    image_dims: list[int | str] = ["height", "width"] if dynamic_size else [height, width]
    output_dims = [batch, *(dim if dim is not None else "anchors" for dim in per_image_output)]
    initializers = [numpy_helper.from_array(_as_stored(value), name) for name, value in constants.items()]
    return helper.make_graph(
        list(nodes),
        "detfleet_test_model",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [batch, 3, *image_dims])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, output_dims)],
        initializer=initializers,
    )


def _as_stored(value: np.ndarray) -> np.ndarray:
    """Floating constants are stored as float32, the only float type the graphs compute in."""
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def _save(
    path: Path,
    graph: onnx.GraphProto,
    names: Sequence[str] | None,
    input_size: tuple[int, int],
    metadata: Mapping[str, str] | None,
) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    properties = ultralytics_metadata(names, input_size) | dict(metadata or {})
    helper.set_model_props(model, properties)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def ultralytics_metadata(names: Sequence[str] | None, input_size: tuple[int, int]) -> dict[str, str]:
    """The metadata_props ultralytics writes that the detector reads; names is left out when None."""
    width, height = input_size
    properties = {"task": "detect", "stride": "32", "imgsz": str([height, width])}
    if names is not None:
        properties["names"] = str(dict(enumerate(names)))
    return properties
