"""Label-free recovery of a pruned detector by distillation from the original model.

No labelled road data exists, and what the deployment needs is the original model's
behaviour, so the teacher's own outputs are the targets (`objective.discrepancy`). The
loss is only a means: what is kept is judged by agreement with the teacher's detections
on a validation slice of the training range (never the held-out frames), the latest step
within a tolerance of the best and never one below the student as given, so distillation
cannot return a student that validation rates worse than the one it was given.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from compressed_perception.atomic import write_json
from compressed_perception.compress.artifacts import torch_model, write_model
from compressed_perception.compress.objective import Levels, Weights, discrepancy
from compressed_perception.compress.report import plot_losses
from compressed_perception.compress.stage import (
    STUDENT,
    BuildContext,
    ModelRef,
    Stage,
    Table,
    Variant,
)
from compressed_perception.datasets import moved
from compressed_perception.errors import ConfigError
from compressed_perception.evaluation.coco import agreement
from compressed_perception.models.hooks import hooked
from compressed_perception.models.nanodet import DeployModel, NanoDet
from compressed_perception.runtime.postprocess import Detections, PostprocessConfig, postprocess
from compressed_perception.runtime.preprocess import Letterbox

Progress = Callable[[int, int, float], None]  # step, steps, loss
PRECISIONS = ("auto", "fp32", "bf16")
# Adam divides each gradient by its own running magnitude, so with its default eps (1e-8)
# the rounding noise of a student that already matches the teacher (gradients of 1e-12 to
# 3e-9) became steps of the full learning rate, and the copy drifted. The floor sits above
# that noise and far below a pruned student's real gradients (median 4e-4).
ADAM_EPS = 1e-6
OPTIMIZERS = ("adamw", "sgd")
FLOOR_BATCHES = 4  # batches that measure the arithmetic's noise floor (_noise_floor)
# ONEDNN_MAX_CPU_ISA values below oneDNN's first ISA with bf16 arithmetic (AVX512_CORE_BF16)
_BELOW_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 600  # at most; stops earlier when validation agreement stops improving
    batch: int = 8
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0  # decay pulls a trained network away from its teacher
    warmup: int = 20  # linear warm-up steps before the cosine decay
    box_weight: float = 1.0
    focal: float = 0.0  # exponent of a quality-focal weight on the class term (0: plain KL)
    logit_weight: float = 0.1  # squared logit error on candidate scores (objective.Weights)
    flip: bool = True  # mirrored frames besides the originals
    # random scale, placement and brightness/contrast per sample: many views of few frames
    # for footage from many cameras (the teacher then runs on every batch); from one fixed
    # camera, as vtest's, they lowered held-out agreement (docs/benchmarks.md)
    augment: bool = False
    scale: tuple[float, float] = (0.6, 1.4)  # of the letterboxed content
    colour: float = 0.2  # brightness and contrast jitter amplitude
    # each sample moved by up to this many input pixels each way, the edge repeated (the
    # teacher then runs on every batch): the scene at every phase of the stride-8 grid, as a
    # camera a little to the side sees it; 0 trains on the frames where they are
    move: int = 7
    validation_frames: int = 80  # the last frames of the training range, never trained on
    validate_every: int = 100  # steps between validations
    # validation merit (mean of mAP and mAP@.5) a later step may lose against the best and
    # still be kept, never below the student as given: 80 consecutive frames of one scene
    # cannot rank steps more finely, and on held-out frames the last steps agreed best (docs)
    tolerance: float = 0.01
    patience: int = 3  # validations in a row further below the best before stopping
    precision: str = "auto"  # bf16 autocast where the CPU (or GPU) has bf16 units
    # layers that compute exactly what the teacher's do (the same weights on the same
    # inputs, as the layers before the first pruned one) are not trained: they are already
    # right, and backward then stops at the first layer that differs (docs/benchmarks.md)
    freeze_shared: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 0,
            "batch": self.batch >= 1,
            "optimizer": self.optimizer in OPTIMIZERS,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup": self.warmup >= 0,
            "box_weight": self.box_weight >= 0,
            "focal": self.focal >= 0,
            "scale": len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1],
            "colour": 0 <= self.colour < 1,
            "move": self.move >= 0,
            "validation_frames": self.validation_frames >= 4,
            "validate_every": self.validate_every >= 1,
            "tolerance": 0 <= self.tolerance < 1,
            "patience": self.patience >= 1,
            "precision": self.precision in PRECISIONS,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ConfigError(f"distill: out of range: {values}")


@dataclass(frozen=True)
class DistillReport:
    losses: list[float]  # per step: total loss
    parts: dict[str, list[float]]  # per step: each loss term
    validation: list[dict[str, float]]  # step, map, map50 (step 0: the student as given)
    kept_step: int
    seconds: float
    settings: dict[str, object]
    precision: str = "fp32"
    stopped_early: bool = False
    noise_floor: float = 0.0  # loss at or under which a step is held (_noise_floor)
    # steps with no update: the loss was within the floor, or no layer was left to train
    steps_held: int = 0
    frozen: list[str] = field(default_factory=list)  # layers shared with the teacher, not trained


def distill(
    student: NanoDet,
    teacher: NanoDet,
    images: Sequence[np.ndarray],
    settings: DistillSettings,
    progress: Progress | None = None,
    device: str = "cpu",
) -> DistillReport:
    """Fine-tune `student` in place to reproduce `teacher` on unlabelled BGR `images`.

    The last `validation_frames` images are held aside to choose the step kept: the
    latest within `tolerance` of the best and not below the student as given (step 0,
    kept when no later step is), returned on the CPU.
    """
    if len(images) < settings.validation_frames + settings.batch:
        raise ConfigError(
            f"distill: {len(images)} training frames, need more than validation_frames "
            f"({settings.validation_frames}) + batch ({settings.batch})"
        )
    if student.config.num_classes != teacher.config.num_classes:
        raise ConfigError("distill: student and teacher predict different classes")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    precision = resolve_precision(settings.precision, device)
    student.to(device)
    teacher = copy.deepcopy(teacher).to(device).eval().requires_grad_(False)
    train = _Samples(images[: -settings.validation_frames], student, settings.flip)
    validator = _Validator(
        _views(images[-settings.validation_frames :], settings.move), teacher, device
    )
    weights = Weights(box=settings.box_weight, focal=settings.focal, logit=settings.logit_weight)
    optimizer = _optimizer(student, settings)
    schedule = _cosine(settings)
    losses: list[float] = []
    parts: dict[str, list[float]] = {}
    kept = _Kept(student, validator.score(student, 0), settings.tolerance)
    sample = train.picked(range(settings.batch)).to(device)
    frozen = _shared(student, teacher, sample) if settings.freeze_shared else []
    with _frozen(student, frozen) as trainable:
        started = time.perf_counter()
        targets = _TeacherCache(teacher, device, precision)
        floor = _noise_floor(train, targets, weights, settings.batch, device)
        held = 0
        for step in range(1, settings.steps + 1):
            student.train()
            batch, target = _batch(train, targets, settings, rng, device)
            with _autocast(device, precision):
                terms = discrepancy(target, student(batch), weights)
            total = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(total.detach()))
            if trainable and losses[-1] > floor:
                _update(student, optimizer, total, settings.lr * schedule(step - 1))
            else:
                held += 1
            for name, value in terms.items():
                parts.setdefault(name, []).append(float(value.detach()))
            if progress is not None:
                progress(step, settings.steps, losses[-1])
            if step % settings.validate_every == 0 or step == settings.steps:
                kept.offer(student, validator.score(student, step))
                if kept.stalled >= settings.patience:
                    break
    kept.restore(student)
    student.cpu().eval()
    return DistillReport(
        losses,
        parts,
        kept.history,
        kept.step,
        time.perf_counter() - started,
        asdict(settings),
        precision,
        stopped_early=len(losses) < settings.steps,
        noise_floor=floor,
        steps_held=held,
        frozen=frozen,
    )


def _batch(
    train: _Samples,
    targets: _TeacherCache,
    settings: DistillSettings,
    rng: np.random.Generator,
    device: str,
) -> tuple[torch.Tensor, Levels]:
    """A training batch and the teacher's outputs on it (cached unless augmented or moved)."""
    if settings.augment:
        batch = train.augmented(settings.batch, settings, rng).to(device)
        return batch, targets.computed(batch)
    picks, batch = train.batch(settings.batch, rng, settings.move)
    batch = batch.to(device)
    if settings.move:
        return batch, targets.computed(batch)
    return batch, targets(picks, batch)


def _views(frames: Sequence[np.ndarray], move: int) -> list[np.ndarray]:
    """The validation frames, and with `move` each also moved that many of its pixels right,
    down and both: scored where training moves them too. On the frames alone, moved training
    rated worse while held-out agreement rose 0.08 mAP@.5; on these views it chose the step
    the held-out frames rated best (docs)."""
    if not move:
        return list(frames)
    return [
        moved(f, dx, dy) for dx, dy in ((0, 0), (move, 0), (0, move), (move, move)) for f in frames
    ]


def _update(student: NanoDet, optimizer: torch.optim.Optimizer, total: Any, lr: float) -> None:
    total.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 10.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()


def _noise_floor(
    train: _Samples,
    targets: _TeacherCache,
    weights: Weights,
    size: int,
    device: str,
) -> float:
    """The largest loss, in size, that the teacher itself computed in fp32 scores against
    the targets as training computes and stores them, over the first FLOOR_BATCHES batches.

    A loss within it is rounding (of bf16 arithmetic, of the fp16 cache, of the loss's own
    BCE-minus-entropy, which put an fp32 copy at -4e-6), not a difference between the
    models, and a step on it only adds noise: Adam scales every gradient to a step of about
    the learning rate, so a bf16 copy of the teacher, moved 1e-8 by such a step, flipped
    the bf16 rounding of some weights and then chased the difference (docs/benchmarks.md).
    Moved or augmented training caches nothing; its floor still counts the cache's fp16
    rounding, which its own targets do not have, so it errs towards holding a step: a copy
    trained on moved samples is still held at every step (tested)."""
    worst = 0.0
    count = len(train.frames)
    for start in range(0, min(count, FLOOR_BATCHES * size), size):
        picks = list(range(start, min(start + size, count)))
        batch = train.picked(picks).to(device)
        with torch.no_grad():
            terms = discrepancy(targets(picks, batch), targets.teacher(batch), weights)
        worst = max(worst, abs(float(sum(terms.values()))))
    return worst


def _shared(student: nn.Module, teacher: nn.Module, batch: torch.Tensor) -> list[str]:
    """The student's layers that compute exactly what the teacher's layer of the same name
    does on `batch`: the same parameters, and the same outputs, so the same inputs too.

    Training them could only move them off what is already right; and when they lead the
    network (the layers before the first pruned one), backward stops where they end, which
    halved a CPU step (docs/benchmarks.md). A layer with buffers (batch norm's running
    statistics) changes in training mode without a step, so it is never counted shared."""
    theirs = dict(teacher.named_modules())
    candidates = [
        name
        for name, module in student.named_modules()
        if _own(module)
        and not list(module.buffers(recurse=False))
        and name in theirs
        and _same_parameters(module, theirs[name])
    ]
    ours, reference = _outputs(student, candidates, batch), _outputs(teacher, candidates, batch)
    return [
        name
        for name in candidates
        if isinstance(ours.get(name), torch.Tensor)
        and isinstance(reference.get(name), torch.Tensor)
        and torch.equal(ours[name], reference[name])
    ]


def _outputs(model: nn.Module, names: Sequence[str], batch: torch.Tensor) -> dict[str, Any]:
    """What the named layers of `model` output on `batch`."""
    modules = dict(model.named_modules())
    found: dict[str, Any] = {}

    def record(name: str, _module: nn.Module, _inputs: Any, output: Any) -> None:
        found[name] = output

    hooks = ((modules[name], functools.partial(record, name)) for name in names)
    with hooked(hooks), torch.no_grad():
        model(batch)
    return found


def _own(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def _same_parameters(ours: nn.Module, theirs: nn.Module) -> bool:
    mine, other = (
        dict(ours.named_parameters(recurse=False)),
        dict(theirs.named_parameters(recurse=False)),
    )
    return mine.keys() == other.keys() and all(
        mine[key].shape == other[key].shape and torch.equal(mine[key], other[key]) for key in mine
    )


@contextlib.contextmanager
def _frozen(student: nn.Module, names: Sequence[str]) -> Iterator[bool]:
    """`names`' own parameters untrained for the duration; yields whether any parameter
    is left to train (none when the student is the teacher)."""
    modules = dict(student.named_modules())
    parameters = [p for name in names for p in _own(modules[name]) if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield any(p.requires_grad for p in student.parameters())
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: bf16 where the hardware computes it natively, else fp32."""
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_has_bf16() else "fp32"


def _cpu_has_bf16() -> bool:
    """The CPU lists bf16 units and nothing caps torch or oneDNN below them: a capped CPU
    still lists its flags, and bf16 autocast then ran 8.7x slower than fp32 (docs)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _BELOW_BF16:
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return _cpu_lists_bf16()


def _cpu_lists_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def _autocast(device: str, precision: str) -> Any:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")


def _optimizer(student: NanoDet, settings: DistillSettings) -> torch.optim.Optimizer:
    params = list(student.parameters())
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay
        )
    return torch.optim.AdamW(
        params, lr=settings.lr, weight_decay=settings.weight_decay, eps=ADAM_EPS
    )


def _cosine(settings: DistillSettings) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        span = max(1, settings.steps - settings.warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - settings.warmup) / span))

    return factor


class _Samples:
    """Training frames letterboxed as at runtime, and their mirror images, cropped to the
    rows and columns any frame's content covers (aligned to the largest stride, so every
    cell is a cell of the full input): the network is fully convolutional, and the
    letterbox's padding would only cost time."""

    def __init__(self, images: Sequence[np.ndarray], model: NanoDet, flip: bool) -> None:
        height, width = model.config.input_size
        letterbox = Letterbox(width, height)
        boxed, spans = [], []
        for index, image in enumerate(images):
            transform = letterbox(image, name=f"training frame {index}")
            spans.append(_content(transform, width, height))
            boxed.append(letterbox.buffer[0].copy())
            if flip:
                boxed.append(np.ascontiguousarray(letterbox.buffer[0][:, ::-1]))
        stride = max(model.config.strides)
        top, left = (_floor(min(span[i] for span in spans), stride) for i in (0, 1))
        bottom = min(height, _ceil(max(span[2] for span in spans), stride))
        right = min(width, _ceil(max(span[3] for span in spans), stride))
        self.frames = np.stack(boxed)[:, top:bottom, left:right]
        self.mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(model.config.std).view(1, 3, 1, 1)

    def batch(
        self, size: int, rng: np.random.Generator, move: int = 0
    ) -> tuple[list[int], torch.Tensor]:
        """Which samples, and them normalised as NCHW float, each moved by a random whole
        number of pixels within `move` each way."""
        picks = sorted(int(p) for p in rng.choice(len(self.frames), size=size, replace=False))
        if not move:
            return picks, self.picked(picks)
        offsets = rng.integers(-move, move + 1, size=(size, 2))
        views = [
            moved(self.frames[pick], int(dx), int(dy))
            for pick, (dx, dy) in zip(picks, offsets, strict=True)
        ]
        return picks, self._normalised(torch.from_numpy(np.stack(views)))

    def picked(self, picks: Sequence[int]) -> torch.Tensor:
        return self._normalised(torch.from_numpy(self.frames[list(picks)]))

    def augmented(
        self, size: int, settings: DistillSettings, rng: np.random.Generator
    ) -> torch.Tensor:
        """Random samples, each rescaled, placed anywhere on a black canvas of the same
        size (cropped where it overflows) and jittered in brightness and contrast."""
        picks = rng.choice(len(self.frames), size=size, replace=False)
        canvas = np.zeros((size, *self.frames.shape[1:]), np.float32)
        for slot, pick in enumerate(picks):
            canvas[slot] = _placed(self.frames[pick], settings, rng)
        return self._normalised(torch.from_numpy(canvas))

    def _normalised(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().permute(0, 3, 1, 2) - self.mean) / self.std


def _placed(frame: np.ndarray, settings: DistillSettings, rng: np.random.Generator) -> np.ndarray:
    height, width = frame.shape[:2]
    factor = rng.uniform(*settings.scale)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resized = cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR).astype(np.float32)
    contrast = 1 + rng.uniform(-settings.colour, settings.colour)
    brightness = 255 * rng.uniform(-settings.colour, settings.colour) / 2
    resized = np.clip(resized * contrast + brightness, 0, 255)
    out = np.zeros((height, width, 3), np.float32)
    rows, cols = resized.shape[:2]
    top = int(rng.integers(min(0, height - rows), max(0, height - rows) + 1))
    left = int(rng.integers(min(0, width - cols), max(0, width - cols) + 1))
    src = resized[max(0, -top) : max(0, -top) + height, max(0, -left) : max(0, -left) + width]
    out[max(0, top) : max(0, top) + src.shape[0], max(0, left) : max(0, left) + src.shape[1]] = src
    return out


def _content(transform: Any, width: int, height: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the image inside the letterboxed input."""
    top, left = int(transform.pad_y), int(transform.pad_x)
    bottom = min(height, round(transform.pad_y + transform.src_height * transform.scale_y))
    right = min(width, round(transform.pad_x + transform.src_width * transform.scale_x))
    return top, left, bottom, right


def _floor(value: int, step: int) -> int:
    return value // step * step


def _ceil(value: int, step: int) -> int:
    return -(-value // step) * step


class _TeacherCache:
    """The teacher's outputs per training sample, computed once: with no random
    augmentation a sample's targets never change, and the teacher's forward pass was a
    third of each step."""

    def __init__(self, teacher: NanoDet, device: str, precision: str) -> None:
        self.teacher = teacher
        self.device = device
        self.precision = precision
        self.store: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def computed(self, batch: torch.Tensor) -> Levels:
        """The teacher's outputs in training precision, not stored."""
        with torch.no_grad(), _autocast(self.device, self.precision):
            return self.teacher(batch)

    def __call__(self, picks: Sequence[int], batch: torch.Tensor) -> Levels:
        missing = [slot for slot, pick in enumerate(picks) if pick not in self.store]
        if missing:
            levels = self.computed(batch[missing])
            for row, slot in enumerate(missing):
                self.store[picks[slot]] = [
                    (cls[row].half().cpu(), box[row].half().cpu()) for cls, box in levels
                ]
        return [
            (
                torch.stack([self.store[p][level][0] for p in picks]).to(self.device).float(),
                torch.stack([self.store[p][level][1] for p in picks]).to(self.device).float(),
            )
            for level in range(len(self.store[picks[0]]))
        ]


class _Validator:
    """Agreement (COCO mAP) of a student's detections with the teacher's on held-aside frames."""

    def __init__(self, images: Sequence[np.ndarray], teacher: NanoDet, device: str) -> None:
        self.images = list(images)
        self.device = device
        self.sizes = [(image.shape[1], image.shape[0]) for image in self.images]
        self.reference = self._detect(teacher)

    def score(self, model: NanoDet, step: int) -> dict[str, float]:
        classes = [str(i) for i in range(model.config.num_classes)]
        result = agreement(self.reference, self._detect(model), self.sizes, classes)
        return {"step": step, "map": round(result.map, 4), "map50": round(result.map50, 4)}

    def _detect(self, model: NanoDet) -> list[Detections]:
        was_training = model.training
        deploy = DeployModel(model).to(self.device).eval()
        height, width = model.config.input_size
        letterbox = Letterbox(width, height)
        config = PostprocessConfig(score_threshold=0.05)
        found = []
        with torch.no_grad():
            for index, image in enumerate(self.images):
                transform = letterbox(image, name=f"validation frame {index}")
                images = torch.from_numpy(letterbox.buffer).to(self.device)
                boxes, scores = deploy(images)
                detections = postprocess(boxes[0].cpu().numpy(), scores[0].cpu().numpy(), config)
                found.append(
                    Detections(
                        transform.to_original(detections.boxes),
                        detections.scores,
                        detections.class_ids,
                    )
                )
        model.train(was_training)
        return found


class _Kept:
    """The step to keep: the latest whose validation merit is within `tolerance` of the best
    seen, since validation cannot rank steps closer than that and later steps have trained
    longer, but never one below step 0 (the student as given): that floor is what keeps a
    distillation from returning a student worse than it received."""

    def __init__(self, model: NanoDet, first: dict[str, float], tolerance: float) -> None:
        self.history = [first]
        self.tolerance = tolerance
        self.floor = self.best = _merit(first)
        self.step = 0
        self.state = _copied(model)
        self.stalled = 0  # validations in a row more than `tolerance` under the best

    def offer(self, model: NanoDet, result: dict[str, float]) -> None:
        self.history.append(result)
        merit = _merit(result)
        self.best = max(self.best, merit)
        if merit < self.best - self.tolerance:
            self.stalled += 1
            return
        self.stalled = 0
        if merit >= self.floor:
            self.step = int(result["step"])
            self.state = _copied(model)

    def restore(self, model: nn.Module) -> None:
        model.load_state_dict(self.state)


def _copied(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _merit(result: dict[str, float]) -> float:
    return (result["map"] + result["map50"]) / 2


def _produce(
    context: BuildContext, parent: ModelRef, settings: DistillSettings, folder: Path
) -> dict[str, Any]:
    student = torch_model(parent.manifest, "distillation")
    bar = tqdm(total=settings.steps, desc="distill", disable=not context.progress)

    def advance(step: int, steps: int, loss: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}")

    report = distill(
        student,
        context.teacher(student.config.input_size),
        context.train_frames,
        settings,
        advance,
        context.device,
    )
    bar.close()
    losses = {"total": report.losses, **report.parts}
    write_json(folder / "losses.json", {**losses, "validation": report.validation})
    plot_losses(losses, folder / "losses.png")
    write_model(
        student,
        folder,
        parent.manifest,
        "distilled",
        dynamic_batch=context.recipe.export.dynamic_batch,
    )
    tail = report.losses[-20:] or [float("nan")]
    return {
        "steps_run": len(report.losses),
        "kept_step": report.kept_step,
        "stopped_early": report.stopped_early,
        "precision": report.precision,
        "move": settings.move,
        "tolerance": settings.tolerance,
        "noise_floor": report.noise_floor,
        "steps_held": report.steps_held,
        "frozen_layers": len(report.frozen),
        "frozen": report.frozen,
        "final_loss": round(float(np.mean(tail)), 5),
        "validation": report.validation,
        "train_seconds": round(report.seconds, 1),
    }


def _tables(info: dict[str, Any]) -> dict[str, Table]:
    history = info.get("validation") or []
    rows = tuple(
        (
            entry["step"],
            f"{entry['map']:.4f}",
            f"{entry['map50']:.4f}",
            "kept" if entry["step"] == info.get("kept_step") else "",
        )
        for entry in history
    )
    move = info.get("move", 0)
    views = (
        f", each also moved {move} px right, down and both as training moves them" if move else ""
    )
    note = (
        "Agreement with the teacher on the validation slice (the last frames of the training "
        f"range, never trained on{views}); step 0 is the student as distillation received it. "
        f"The step kept is the latest within {info.get('tolerance', 0)} of the best in the mean "
        "of mAP and mAP@.5 and not below step 0."
    )
    columns = ("step", "validation mAP", "validation mAP@.5", "")
    return {"Distillation validation": Table(columns, rows, note)} if rows else {}


STAGE = Stage(
    section="distill",
    settings=DistillSettings,
    produce=_produce,
    variants=(Variant(STUDENT, "distill", "distilled"),),
    makes_student=True,
    revision=4,  # the latest step within tolerance of the best, never below step 0, is kept
    tables=_tables,
)
