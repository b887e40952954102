"""``make train``: trains the shipped detector from generated frames on the CPU, exports it to ONNX and writes
the model card.

The model is a small anchor-free detector: a conv-BN-SiLU backbone down to stride 32, a top-down neck back to
stride 8 and one head there. Every cell of the 40 x 40 grid predicts one score per class and the distances
from its centre to the four sides of a box. A cell learns an object when it lies near the object's centre
(FCOS centre sampling; the smallest object wins a cell two objects claim). The ONNX graph ends in the layout
of an ultralytics YOLOv8 head, [B, 4 + classes, cells] with cx, cy, w, h in input pixels and sigmoid scores,
so the consumer's decoder runs it unchanged. Training inputs go through the consumer's own letterbox.

Everything is seeded: the same command writes the same model. Frames come from detfleet.synth, rendered on
the fly from consecutive seeds; the held-out frames come from seeds far from those.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

from consumer.detector import DecodedFrame, DetectorConfig, load_detector
from consumer.detector.preprocess import to_blob
from detfleet import accuracy, synth

MODEL_NAME = "detfleet-line-320.onnx"
MODELS = Path(__file__).resolve().parent.parent / "models"
INPUT_SIZE = 320  # square canvas, as the consumer letterboxes to it
STRIDE = 8
GRID = INPUT_SIZE // STRIDE
THREADS = 2
TORCH_SEED = 20_260_101
TRAIN_SEED = 0  # training frame i is synth.render_scene(TRAIN_SEED + i, size)
HELD_OUT_SEED = 5_000_000  # far past any training frame; the fleet test uses 7_000_000 and up
HELD_OUT_FRAMES = 500
HELD_OUT_SIZE = (640, 480)
MIXED_OUT_SEED = 6_000_000  # a second held-out set in the other frame sizes the fleet sees
MIXED_OUT_FRAMES = 200
JPEG_QUALITY = 90
STEPS = 1000
BATCH = 16
LEARNING_RATE = 3e-3
WARMUP_STEPS = 30
WEIGHT_DECAY = 5e-4
CENTRE_RADIUS = 1.5  # in cells: how far from an object's centre a cell may be and still learn it
BOX_LOSS_WEIGHT = 2.0
# Frame sizes drawn for training, weighted towards the common 4:3; portrait and 16:9 letterbox differently.
TRAIN_SIZES = (
    (640, 480),
    (640, 480),
    (640, 480),
    (500, 375),
    (375, 500),
    (480, 640),
    (800, 600),
    (333, 250),
    (960, 540),
    (1280, 720),
)
MIXED_SIZES = ((500, 375), (375, 500), (1280, 720), (333, 250), (800, 600), (480, 640))

console = Console()


# ---- the model ---------------------------------------------------------------------------------------------


def conv(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.SiLU(inplace=True),
    )


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(channels, channels), conv(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class LineDetector(nn.Module):
    """Raw outputs per cell of the stride-8 grid: class logits [B, C, G, G], side distances [B, 4, G, G]."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        # Few layers at the fine strides, where a layer costs the most; the depth sits at strides 16 and 32.
        self.stem = nn.Sequential(conv(3, 16, 2), conv(16, 24, 2))  # stride 4
        self.stage3 = conv(24, 48, 2)  # stride 8
        self.stage4 = nn.Sequential(conv(48, 80, 2), Residual(80))  # stride 16
        self.stage5 = nn.Sequential(conv(80, 112, 2), Residual(112))  # stride 32: context for big parts
        self.lateral5 = conv(112, 80, kernel=1)
        self.merge4 = conv(80, 80)
        self.lateral4 = conv(80, 48, kernel=1)
        self.merge3 = conv(48, 64)
        self.classes = nn.Conv2d(64, classes, 1)
        self.sides = nn.Conv2d(64, 4, 1)
        prior = 0.01  # focal-loss practice: start every cell at a low score
        bias = self.classes.bias
        assert bias is not None  # the layer is built with one
        nn.init.constant_(bias, -math.log((1 - prior) / prior))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        c3 = self.stage3(self.stem(images))
        c4 = self.stage4(c3)
        c5 = self.stage5(c4)
        p4 = self.merge4(c4 + F.interpolate(self.lateral5(c5), scale_factor=2.0, mode="nearest"))
        p3 = self.merge3(c3 + F.interpolate(self.lateral4(p4), scale_factor=2.0, mode="nearest"))
        return self.classes(p3), F.softplus(self.sides(p3)) * STRIDE


def cell_centres() -> Tensor:
    """[N, 2] x, y of every grid cell's centre in input pixels, row by row."""
    ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    return (torch.stack([xs, ys], dim=-1).reshape(-1, 2).float() + 0.5) * STRIDE


class ExportHead(nn.Module):
    """The trained model with a YOLOv8-style output: [B, 4 + C, N] of cx, cy, w, h and sigmoid scores."""

    def __init__(self, model: LineDetector) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("centres", cell_centres().T.contiguous())  # [2, N]

    def forward(self, images: Tensor) -> Tensor:
        logits, sides = self.model(images)
        batch = images.shape[0]
        sides = sides.reshape(batch, 4, -1)
        top_left = self.centres - sides[:, :2]
        bottom_right = self.centres + sides[:, 2:]
        boxes = torch.cat([(top_left + bottom_right) / 2, bottom_right - top_left], dim=1)
        return torch.cat([boxes, logits.reshape(batch, logits.shape[1], -1).sigmoid()], dim=1)


# ---- the data ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    images: Tensor  # [B, 3, S, S] float32 RGB in [0, 1], letterboxed
    boxes: Tensor  # [B, M, 4] x1, y1, x2, y2 in canvas pixels, zero rows past each image's objects
    labels: Tensor  # [B, M] class index, -1 for padding


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cannot encode a training frame")
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if decoded is None:
        raise RuntimeError("cannot decode a training frame")
    return decoded


def training_frame(seed: int) -> synth.Scene:
    """Frame seed of the training stream: its size and JPEG quality are drawn from the seed too."""
    rng = np.random.default_rng([seed, 1])
    scene = synth.render_scene(seed, TRAIN_SIZES[int(rng.integers(len(TRAIN_SIZES)))])
    if rng.random() < 0.8:  # the fleet receives JPEG; some cameras send PNG
        return synth.Scene(jpeg_round_trip(scene.image, int(rng.integers(60, 96))), scene.boxes)
    return scene


def make_batch(scenes: Sequence[synth.Scene]) -> Batch:
    blob, placements = to_blob([s.image for s in scenes], (INPUT_SIZE, INPUT_SIZE))
    most = max(1, max(len(s.boxes) for s in scenes))
    boxes = np.zeros((len(scenes), most, 4), np.float32)
    labels = np.full((len(scenes), most), -1, np.int64)
    for row, (scene, placement) in enumerate(zip(scenes, placements, strict=True)):
        if scene.boxes:
            source = np.array([[b.x1, b.y1, b.x2, b.y2] for b in scene.boxes], np.float32)
            boxes[row, : len(scene.boxes)] = placement.to_canvas(source)
            labels[row, : len(scene.boxes)] = [b.label for b in scene.boxes]
    return Batch(torch.from_numpy(blob.copy()), torch.from_numpy(boxes), torch.from_numpy(labels))


def batches(steps: int) -> Iterator[Batch]:
    for step in range(steps):
        first = TRAIN_SEED + step * BATCH
        yield make_batch([training_frame(first + i) for i in range(BATCH)])


# ---- the loss ----------------------------------------------------------------------------------------------


def assign(batch: Batch, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Per cell: the index of the object it learns (or -1) and that object's box. [B, N], [B, N, 4]."""
    boxes, valid = batch.boxes, batch.labels >= 0  # [B, M, 4], [B, M]
    x, y = centres[:, 0].view(1, -1, 1), centres[:, 1].view(1, -1, 1)  # [1, N, 1]
    x1, y1, x2, y2 = (boxes[..., i].unsqueeze(1) for i in range(4))  # [B, 1, M]
    box_x, box_y = (x1 + x2) / 2, (y1 + y2) / 2
    inside = (x > x1) & (x < x2) & (y > y1) & (y < y2)
    reach = CENTRE_RADIUS * STRIDE
    near = ((x - box_x).abs() < reach) & ((y - box_y).abs() < reach)
    # The cell holding an object's centre always learns it, however small the object.
    same_column = (x / STRIDE).floor() == (box_x / STRIDE).floor()
    home = same_column & ((y / STRIDE).floor() == (box_y / STRIDE).floor())
    claims = ((inside & near) | home) & valid.unsqueeze(1)
    area = ((x2 - x1) * (y2 - y1)).expand_as(claims)
    cost = torch.where(claims, area, torch.full_like(area, float("inf")))
    best_cost, best = cost.min(dim=2)  # the smallest object wins a shared cell
    owner = torch.where(torch.isfinite(best_cost), best, torch.full_like(best, -1))
    targets = torch.gather(boxes, 1, best.unsqueeze(-1).expand(-1, -1, 4))
    return owner, targets


def quality_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss towards soft targets (QFL): a learning cell's target is the IoU² its box reaches, so a cell
    with a poor box scores low and the consumer's threshold and NMS keep the well-placed one."""
    probability = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (cross_entropy * (probability - targets).abs().pow(gamma)).sum()


def iou(predicted: Tensor, target: Tensor) -> Tensor:
    """IoU per pair of x1, y1, x2, y2 boxes."""
    top_left = torch.max(predicted[:, :2], target[:, :2])
    bottom_right = torch.min(predicted[:, 2:], target[:, 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area_p = (predicted[:, 2:] - predicted[:, :2]).clamp(min=0).prod(dim=1)
    area_t = (target[:, 2:] - target[:, :2]).clamp(min=0).prod(dim=1)
    return overlap / (area_p + area_t - overlap + 1e-6)


def giou_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """1 - generalised IoU per pair of x1, y1, x2, y2 boxes."""
    top_left = torch.max(predicted[:, :2], target[:, :2])
    bottom_right = torch.min(predicted[:, 2:], target[:, 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area_p = (predicted[:, 2:] - predicted[:, :2]).clamp(min=0).prod(dim=1)
    area_t = (target[:, 2:] - target[:, :2]).clamp(min=0).prod(dim=1)
    union = area_p + area_t - overlap + 1e-6
    hull_size = torch.max(predicted[:, 2:], target[:, 2:]) - torch.min(predicted[:, :2], target[:, :2])
    hull = hull_size.prod(dim=1)
    giou = overlap / union - (hull - union) / (hull + 1e-6)
    return 1 - giou


def detection_loss(
    model: LineDetector, batch: Batch, centres: Tensor, classes: int
) -> tuple[Tensor, dict[str, float]]:
    logits, sides = model(batch.images)
    size = logits.shape[0]
    logits = logits.reshape(size, classes, -1).transpose(1, 2)  # [B, N, C]
    sides = sides.reshape(size, 4, -1).transpose(1, 2)  # [B, N, 4]
    owner, target_boxes = assign(batch, centres)
    positive = owner >= 0
    labels = torch.gather(batch.labels, 1, owner.clamp(min=0))
    predicted = torch.cat([centres - sides[..., :2], centres + sides[..., 2:]], dim=-1)[positive]
    wanted = target_boxes[positive]
    box_error = giou_loss(predicted, wanted)
    with torch.no_grad():
        # IoU squared: a box must overlap its object by 0.5 to score the consumer's default threshold of
        # 0.25, so the near misses around thin objects (scratches) fall below it instead of becoming FPs.
        quality = iou(predicted, wanted).pow(2).clamp(min=0.01)
    class_targets = torch.zeros_like(logits)
    class_targets[positive] = F.one_hot(labels[positive], classes).float() * quality.unsqueeze(1)
    positives = max(1.0, float(positive.sum()))
    class_loss = quality_focal_loss(logits, class_targets) / positives
    box_loss = box_error.mean() if len(wanted) else sides.sum() * 0
    l1 = (predicted - wanted).abs().mean() / STRIDE if len(wanted) else sides.sum() * 0
    total = class_loss + BOX_LOSS_WEIGHT * box_loss + 0.5 * l1
    parts = {"class": class_loss.item(), "giou": box_loss.item(), "l1": l1.item()}
    return total, parts


# ---- training ----------------------------------------------------------------------------------------------


def learning_rate(step: int, steps: int) -> float:
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return LEARNING_RATE * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(steps: int) -> LineDetector:
    torch.manual_seed(TORCH_SEED)
    model = LineDetector(len(synth.CLASS_NAMES))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
    )
    centres = cell_centres()
    model.train()
    started = time.perf_counter()
    for step, batch in enumerate(batches(steps)):
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, steps)
        loss, parts = detection_loss(model, batch, centres, len(synth.CLASS_NAMES))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimiser.step()
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            console.print(
                f"step {step + 1:>5}/{steps}  loss {loss.item():.3f}  "
                + "  ".join(f"{k} {v:.3f}" for k, v in parts.items())
                + f"  lr {learning_rate(step, steps):.2e}  {elapsed:6.0f} s"
            )
    return model.eval()


# ---- export ------------------------------------------------------------------------------------------------


def export(model: LineDetector, path: Path) -> None:
    """ONNX, opset 17, any batch size, named and described like an ultralytics export."""
    import onnx

    head = ExportHead(model).eval()
    example = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        head,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["output0"],
        dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
        opset_version=17,
        do_constant_folding=True,
        dynamo=False,
    )
    graph = onnx.load(str(path))
    names = dict(enumerate(synth.CLASS_NAMES))
    metadata = {
        "description": "detfleet production-line detector (parts, empty pockets, scratches, debris)",
        "author": "detfleet",
        "version": "1",
        "task": "detect",
        "stride": str(STRIDE),
        "imgsz": str([INPUT_SIZE, INPUT_SIZE]),
        "names": str(names),
    }
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name = "detfleet.train"
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


# ---- evaluation --------------------------------------------------------------------------------------------


def held_out(seed: int, count: int, sizes: Sequence[tuple[int, int]]) -> list[synth.Scene]:
    """Held-out frames as the fleet gets them: JPEG quality 90, decoded again."""
    scenes = [synth.render_scene(seed + i, sizes[i % len(sizes)]) for i in range(count)]
    return [synth.Scene(jpeg_round_trip(s.image, JPEG_QUALITY), s.boxes) for s in scenes]


def evaluate(path: Path, scenes: Sequence[synth.Scene]) -> accuracy.Scores:
    """Through the consumer's own loader and decoder, at its default thresholds."""
    detector = load_detector(DetectorConfig(model_path=path, device="cpu", intra_op_threads=THREADS))
    predicted: list[tuple[synth.Box, ...]] = []
    for start in range(0, len(scenes), 16):
        found = detector.detect([DecodedFrame.of(s.image) for s in scenes[start : start + 16]])
        predicted += [tuple(synth.Box(d.class_id, *d.box, score=d.score) for d in image) for image in found]
    return accuracy.score(predicted, [s.boxes for s in scenes], synth.CLASS_NAMES)


# ---- the model card ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    parameters: int
    size_bytes: int
    sha256: str
    steps: int
    train_seconds: float
    total_seconds: float
    load: str
    main: accuracy.Scores
    mixed: accuracy.Scores


def scores_table(scores: accuracy.Scores) -> list[str]:
    lines = ["| class | precision | recall | AP@0.5 |", "|---|---|---|---|"]
    for name, (precision, recall, ap) in scores.per_class.items():
        lines.append(f"| {name} | {precision:.3f} | {recall:.3f} | {ap:.3f} |")
    overall = (scores.precision, scores.recall, scores.map50)
    lines.append("| **all** | **{:.3f}** | **{:.3f}** | **{:.3f}** |".format(*overall))
    counts = (scores.true_positives, scores.false_positives, scores.false_negatives)
    lines += ["", "True positives {}, false positives {}, false negatives {}.".format(*counts)]
    return lines


def write_card(path: Path, report: Report) -> None:
    classes = ", ".join(f"{i} `{name}`" for i, name in enumerate(synth.CLASS_NAMES))
    frames = report.steps * BATCH
    text = [
        "# detfleet-line-320",
        "",
        "The detector the fleet runs by default: parts and defects on a production-line conveyor.",
        "It is trained only on frames drawn by `detfleet/synth.py`; on real footage it is a placeholder to",
        "swap for a model trained on that footage (any ultralytics YOLOv8-style ONNX export works).",
        "",
        "| | |",
        "|---|---|",
        f"| file | `models/{MODEL_NAME}` ({report.size_bytes / 1e6:.2f} MB) |",
        f"| sha256 | `{report.sha256}` |",
        f"| classes | {classes} |",
        f"| input | `images`: float32 [batch, 3, {INPUT_SIZE}, {INPUT_SIZE}], RGB in [0, 1], centred "
        "letterbox, pad 114; any batch size |",
        f"| output | `output0`: float32 [batch, {4 + len(synth.CLASS_NAMES)}, {GRID * GRID}]: cx, cy, w, h "
        "in input pixels, then one sigmoid score per class (the YOLOv8 head layout; NMS is the consumer's) |",
        "| metadata | `names` (a dict literal), `imgsz` `[320, 320]`, `description`, `version`, `stride` |",
        "| opset | 17 |",
        "",
        "## Classes",
        "",
        "- `part`: a metal part on the belt: a plate with holes, a round flange or an L-shaped bracket.",
        "- `missing_part`: an empty pocket of the carrier: a dark recess in a yellow painted outline.",
        "- `scratch`: a thin dark gouge on a part (boxed on its own, inside the part's box).",
        "- `foreign_object`: debris: an irregular blob of saturated colour.",
        "",
        "## Architecture",
        "",
        f"Anchor-free, one head at stride 8 ({GRID} x {GRID} cells), {report.parameters:,} parameters. "
        "Backbone conv-BN-SiLU down to stride 32 (16-24-48-80-112 channels, residual blocks at strides "
        "16 and 32), a top-down neck back to stride 8 and two 1x1 outputs per cell: class logits and the "
        f"distances to the four box sides (softplus x {STRIDE}).",
        f"Each object is learnt by the cells within {CENTRE_RADIUS} cells of its centre and inside its box,",
        "and always by the cell holding its centre; a cell two objects claim learns the smaller.",
        "Losses: quality focal loss on the classes (a learning cell's target is the square of the IoU its",
        "box reaches, so a box must overlap its object by 0.5 to reach the default threshold of 0.25),",
        "GIoU and L1 on the boxes.",
        "",
        "## Data",
        "",
        f"Frames from `detfleet.synth.render_scene(seed, size)`: training frame i has seed {TRAIN_SEED} + i "
        f"({frames:,} frames, seeds {TRAIN_SEED} to {TRAIN_SEED + frames - 1}), rendered on the fly, its "
        f"size drawn from {', '.join(f'{w}x{h}' for w, h in sorted(set(TRAIN_SIZES)))}, 80% of them "
        "through JPEG quality 60 to 95. The generator varies the belt (rubber, mesh, slats, seams, rails), "
        "lighting gradient, exposure, colour temperature, focus and motion blur, sensor noise, a mild "
        "perspective and the scale; boxes come from the drawn outlines after the warp.",
        "Inputs go through the consumer's own letterbox (`consumer.detector.preprocess.to_blob`).",
        "",
        "## Training",
        "",
        f"`make train` (= `python -m detfleet.train`): {report.steps} steps of {BATCH} frames, AdamW "
        f"(lr {LEARNING_RATE}, {WARMUP_STEPS} warm-up steps, cosine decay, weight decay {WEIGHT_DECAY}), "
        f"torch seed {TORCH_SEED}, {THREADS} CPU threads, torch {torch.__version__}.",
        f"Measured on this machine ({platform.processor() or platform.machine()}, {THREADS} threads): "
        f"training {report.train_seconds / 60:.1f} min, the whole command (training, export, evaluation, "
        f"this card) {report.total_seconds / 60:.1f} min; load average at the end {report.load}.",
        "Everything is seeded and torch runs its deterministic algorithms, so the same command on the same",
        "torch and CPU should write the same weights (compare the sha256 below).",
        "",
        "## Held-out accuracy",
        "",
        f"{HELD_OUT_FRAMES} frames {HELD_OUT_SIZE[0]}x{HELD_OUT_SIZE[1]}, seeds {HELD_OUT_SEED} to "
        f"{HELD_OUT_SEED + HELD_OUT_FRAMES - 1} (never trained on), encoded as JPEG quality {JPEG_QUALITY} "
        "and decoded again, run through `consumer.detector.load_detector` at its defaults (confidence 0.25, "
        "NMS IoU 0.45), matched at IoU 0.5 by `detfleet.accuracy.score`:",
        "",
        *scores_table(report.main),
        "",
        f"{MIXED_OUT_FRAMES} frames in other sizes ({', '.join(f'{w}x{h}' for w, h in MIXED_SIZES)}), seeds "
        f"{MIXED_OUT_SEED} to {MIXED_OUT_SEED + MIXED_OUT_FRAMES - 1}, same procedure:",
        "",
        *scores_table(report.mixed),
        "",
        "## Retraining",
        "",
        "`make train` installs the `train` extra (torch CPU, onnx, onnxscript), trains, exports "
        f"`models/{MODEL_NAME}`, evaluates it and rewrites this card with the new hash and figures. To "
        "change the classes or the look of the frames, edit `detfleet/synth.py`; the class names travel in "
        "the model's metadata, so the consumer needs no change.",
        "",
    ]
    path.write_text("\n".join(text), encoding="utf-8")


# ---- the command -------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m detfleet.train", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=MODELS, help="folder for the model and its card")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    cv2.setNumThreads(1)  # rendering stays deterministic and out of torch's way
    model = train(args.steps)
    train_seconds = time.perf_counter() - started
    path = args.out / MODEL_NAME
    export(model, path)
    console.print(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB); evaluating on held-out frames")
    main_scores = evaluate(path, held_out(HELD_OUT_SEED, HELD_OUT_FRAMES, [HELD_OUT_SIZE]))
    mixed_scores = evaluate(path, held_out(MIXED_OUT_SEED, MIXED_OUT_FRAMES, MIXED_SIZES))
    report = Report(
        parameters=sum(p.numel() for p in model.parameters()),
        size_bytes=path.stat().st_size,
        sha256=sha256_of(path),
        steps=args.steps,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        load=load_average(),
        main=main_scores,
        mixed=mixed_scores,
    )
    write_card(args.out / "README.md", report)
    console.print(*scores_table(main_scores), sep="\n")
    console.print(*scores_table(mixed_scores), sep="\n")
    console.print(f"wrote {args.out / 'README.md'}; {report.total_seconds / 60:.1f} min in all")


if __name__ == "__main__":
    main()
