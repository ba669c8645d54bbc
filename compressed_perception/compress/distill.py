"""Label-free recovery of a pruned detector by distillation from the original model.

No labelled road data exists, and what the deployment needs is the original model's
behaviour, so the teacher's own outputs are the targets: its class probabilities
(quality-focal weighted, so the few cells with objects are not drowned by background),
its box-side distributions (weighted by how sure the teacher is that a cell holds an
object) and its neck features (through a 1x1 adapter, since pruning narrowed them).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressed_perception.errors import ConfigError
from compressed_perception.models.nanodet import NanoDet, flatten_levels

Progress = Callable[[int, int, float], None]  # step, steps, loss


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 600
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 20  # linear warm-up steps before the cosine decay
    box_weight: float = 1.0
    feature_weight: float = 1.0
    flip: bool = True
    scale: tuple[float, float] = (0.8, 1.2)  # letterbox scale jitter
    colour: float = 0.2  # brightness and contrast jitter amplitude
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 0,
            "batch": self.batch >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup": self.warmup >= 0,
            "box_weight": self.box_weight >= 0,
            "feature_weight": self.feature_weight >= 0,
            "scale": len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1],
            "colour": 0 <= self.colour < 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ConfigError(f"distill: out of range: {values}")


@dataclass(frozen=True)
class DistillReport:
    losses: list[float]  # per step: total loss
    parts: dict[str, list[float]]  # per step: each loss term
    seconds: float
    settings: dict[str, object]


def distill(
    student: NanoDet,
    teacher: NanoDet,
    images: Sequence[np.ndarray],
    settings: DistillSettings,
    progress: Progress | None = None,
) -> DistillReport:
    """Fine-tune `student` in place to reproduce `teacher` on unlabelled BGR `images`."""
    if not images:
        raise ConfigError("distill: no training frames")
    if student.config.num_classes != teacher.config.num_classes:
        raise ConfigError("distill: student and teacher predict different classes")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
    adapters = _adapters(student, teacher)
    params = [*student.parameters(), *adapters.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(settings))
    student.train()
    losses: list[float] = []
    parts: dict[str, list[float]] = {"class": [], "box": [], "feature": []}
    started = time.perf_counter()
    for step in range(settings.steps):
        batch = _batch(images, student, settings, rng)
        terms = _losses(student, teacher, adapters, batch, settings)
        total = terms["class"] + terms["box"] + terms["feature"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        schedule.step()
        losses.append(float(total.detach()))
        for name, value in terms.items():
            parts[name].append(float(value.detach()))
        if progress is not None:
            progress(step + 1, settings.steps, losses[-1])
    student.eval()
    seconds = time.perf_counter() - started
    return DistillReport(losses, parts, seconds, asdict(settings))


def _adapters(student: NanoDet, teacher: NanoDet) -> nn.ModuleList:
    """1x1 convolutions from the student's narrowed neck to the teacher's width."""
    width = teacher.config.neck_channels
    probe = torch.zeros(1, 3, *student.config.input_size)
    with torch.no_grad():
        widths = [f.shape[1] for f in student.neck(student.backbone(probe))]
    return nn.ModuleList(nn.Conv2d(w, width, 1) for w in widths)


def _cosine(settings: DistillSettings) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        span = max(1, settings.steps - settings.warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - settings.warmup) / span))

    return factor


def _losses(
    student: NanoDet,
    teacher: NanoDet,
    adapters: nn.ModuleList,
    batch: torch.Tensor,
    settings: DistillSettings,
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        t_features = teacher.neck(teacher.backbone(batch))
        t_levels = teacher.head(t_features)
    s_features = student.neck(student.backbone(batch))
    s_levels = student.head(s_features)
    t_cls, t_box = flatten_levels(t_levels)
    s_cls, s_box = flatten_levels(s_levels)
    t_prob = t_cls.sigmoid()
    objectness = t_prob.amax(dim=-1)  # (B, N): how sure the teacher is of any object
    norm = objectness.sum().clamp(min=1.0)
    focal = (s_cls.sigmoid() - t_prob).abs().pow(2)
    class_loss = F.binary_cross_entropy_with_logits(s_cls, t_prob, reduction="none") * focal
    bins = t_box.shape[-1] // 4
    t_dist = t_box.unflatten(-1, (4, bins)).log_softmax(-1)
    s_dist = s_box.unflatten(-1, (4, bins)).log_softmax(-1)
    kl = (t_dist.exp() * (t_dist - s_dist)).sum(-1).mean(-1)  # (B, N)
    feature = sum(
        F.mse_loss(adapter(s), t) / t.var().clamp(min=1e-6)
        for adapter, s, t in zip(adapters, s_features, t_features, strict=True)
    )
    return {
        "class": class_loss.sum() / norm,
        "box": settings.box_weight * (kl * objectness).sum() / norm,
        "feature": settings.feature_weight * feature / len(adapters),
    }


def _batch(
    images: Sequence[np.ndarray],
    model: NanoDet,
    settings: DistillSettings,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Augmented, letterboxed, normalized NCHW float batch."""
    height, width = model.config.input_size
    picks = rng.integers(0, len(images), settings.batch)
    canvas = np.zeros((settings.batch, height, width, 3), np.float32)
    for slot, index in enumerate(picks):
        canvas[slot] = _augment(images[index], height, width, settings, rng)
    mean = np.asarray(model.config.mean, np.float32)
    std = np.asarray(model.config.std, np.float32)
    return torch.from_numpy((canvas - mean) / std).permute(0, 3, 1, 2).contiguous()


def _augment(
    image: np.ndarray, height: int, width: int, settings: DistillSettings, rng: np.random.Generator
) -> np.ndarray:
    """Scale-jittered letterbox at a random offset, optional flip, brightness and contrast."""
    fit = min(height / image.shape[0], width / image.shape[1])
    scale = fit * rng.uniform(*settings.scale)
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR).astype(np.float32)
    contrast = 1 + rng.uniform(-settings.colour, settings.colour)
    brightness = 255 * rng.uniform(-settings.colour, settings.colour) / 2
    resized = np.clip(resized * contrast + brightness, 0, 255)
    out = np.zeros((height, width, 3), np.float32)
    rows, cols = resized.shape[:2]
    top = int(rng.integers(min(0, height - rows), max(0, height - rows) + 1))
    left = int(rng.integers(min(0, width - cols), max(0, width - cols) + 1))
    src = resized[max(0, -top) : max(0, -top) + height, max(0, -left) : max(0, -left) + width]
    out[max(0, top) : max(0, top) + src.shape[0], max(0, left) : max(0, left) + src.shape[1]] = src
    return out[:, ::-1] if settings.flip and rng.random() < 0.5 else out
