"""Label-free layer-wise reconstruction of a pruned model from the original, no training.

Every convolution is refitted in forward order by ridge regression: from the inputs it
receives in the pruned model (whose earlier layers are already refitted) to the outputs
the same convolution gives in the original model, on the output channels it kept. Each
layer thereby undoes the error of the layers before it as far as a linear map can. A
layer that was not pruned and whose inputs are exact is left as it is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from compressed_perception.atomic import write_json
from compressed_perception.compress.artifacts import torch_model, write_model
from compressed_perception.compress.linear import (
    patches,
    ridge_solve,
    set_weight_matrix,
    weight_matrix,
    with_ones,
)
from compressed_perception.compress.prune import KEPT, normalized_batches
from compressed_perception.compress.stage import STUDENT, BuildContext, ModelRef, Stage, Variant
from compressed_perception.errors import ConfigError, ModelError
from compressed_perception.models.nanodet import NanoDet

Progress = Callable[[int, int], None]  # layers done, layers


@dataclass(frozen=True)
class ReconstructSettings:
    calibration_frames: int = 128  # training frames (each also mirrored)
    ridge: float = 1e-3  # regularisation, relative to the mean variance of a layer's inputs
    flip: bool = True  # mirrored frames as well: twice the samples, no bias to one side
    # head layers weight each cell by the teacher's objectness there, plus this floor
    # (1.0 or more: every cell alike): their error matters where there are objects
    background_weight: float = 0.1
    # the output convolutions, after their least-squares fit, minimise the detection
    # objective itself (class and box KL to the teacher), which is convex in their weights
    fit_outputs: bool = True

    def __post_init__(self) -> None:
        if self.calibration_frames < 4:
            raise ConfigError(
                f"reconstruct calibration_frames: {self.calibration_frames} is too few (>= 4)"
            )
        if not 0 < self.ridge < 1:
            raise ConfigError(f"reconstruct ridge: {self.ridge} is outside (0, 1)")


@dataclass(frozen=True)
class ReconstructReport:
    layers: dict[str, dict[str, float]]  # conv -> relative output error before and after
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {"layers": self.layers, "seconds": round(self.seconds, 1)}


OUTPUT_FIT_ITERATIONS = 100


class _StopForwardError(Exception):
    """Raised by a hook once the layer of interest has been seen: the rest is not needed."""


def reconstruct(
    student: NanoDet,
    teacher: NanoDet,
    kept: dict[str, Sequence[int]],
    images: Sequence[np.ndarray],
    settings: ReconstructSettings,
    progress: Progress | None = None,
    device: str = "cpu",
) -> ReconstructReport:
    """Refit `student` in place; `kept[conv]` lists the teacher's output channels it kept.

    Runs on `device`; the student is returned on the CPU.
    """
    started = time.perf_counter()
    student.to(device).eval()
    teacher = teacher.to(device).eval()
    frames = list(images)
    if settings.flip:
        frames += [np.ascontiguousarray(image[:, ::-1]) for image in frames]
    batches = [batch.to(device) for batch in normalized_batches(teacher, frames)]
    order = _execution_order(student, batches[0][:1])
    _check_kept(student, teacher, kept, order)
    layers: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        targets = _targets(teacher, order[1:], kept, batches)
        weights = _cell_weights(teacher, batches, settings.background_weight)
        for done, name in enumerate(order):
            if done == 0:
                continue  # the first conv reads the image itself: its input is exact
            level = _level_of(student, name)
            cells = weights.get(level)
            wanted = targets.pop(name)
            layers[name] = _refit(student, name, wanted, batches, settings, cells)
            if settings.fit_outputs and name == f"head.preds.{level}":
                classes = student.config.num_classes
                floor = min(settings.background_weight, 1.0)
                layers[name].update(_fit_output(student, name, wanted, batches, classes, floor))
            if progress is not None:
                progress(done + 1, len(order))
    student.cpu()
    return ReconstructReport(layers, time.perf_counter() - started)


def _execution_order(model: NanoDet, probe: torch.Tensor) -> list[str]:
    order: list[str] = []
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    handles = [m.register_forward_hook(lambda *_, n=n: order.append(n)) for n, m in convs.items()]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _check_kept(
    student: NanoDet, teacher: NanoDet, kept: dict[str, Sequence[int]], order: Sequence[str]
) -> None:
    small = dict(student.named_modules())
    large = dict(teacher.named_modules())
    for name in order:
        channels = kept.get(name)
        if name not in large or channels is None:
            raise ModelError(f"reconstruct: no record of which channels {name} kept")
        if len(channels) != small[name].out_channels or max(channels) >= large[name].out_channels:
            raise ModelError(
                f"reconstruct: {name} has {small[name].out_channels} output channels, the "
                f"record lists {len(channels)} of the original's {large[name].out_channels}"
            )


def _targets(
    teacher: NanoDet,
    names: Sequence[str],
    kept: dict[str, Sequence[int]],
    batches: Sequence[torch.Tensor],
) -> dict[str, list[torch.Tensor]]:
    """Per conv and batch, the original's outputs on the kept channels: one pass each."""
    modules = dict(teacher.named_modules())
    found: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def keep(name: str) -> Callable[..., None]:
        channels = torch.tensor(list(kept[name]), device=batches[0].device)

        def hook(_m: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            found[name].append(output.index_select(1, channels))

        return hook

    handles = [modules[name].register_forward_hook(keep(name)) for name in names]
    try:
        for batch in batches:
            teacher(batch)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _level_of(model: NanoDet, name: str) -> int | None:
    """The output level a head convolution serves alone (None for shared layers)."""
    for level in range(len(model.head.preds)):
        if name in (f"head.convs.{level}.conv", f"head.preds.{level}"):
            return level
    return None


def _cell_weights(
    teacher: NanoDet, batches: Sequence[torch.Tensor], floor: float
) -> dict[int, list[torch.Tensor]]:
    """Per level and batch, (B, H, W) weights: the teacher's objectness plus `floor`."""
    if floor >= 1.0:
        return {}
    found: dict[int, list[torch.Tensor]] = {}
    classes = teacher.config.num_classes
    for batch in batches:
        for level, (logits, _box) in enumerate(teacher(batch)):
            objectness = logits[:, :classes].sigmoid().amax(dim=1)
            found.setdefault(level, []).append(objectness + floor)
    return found


def _input_of(model: NanoDet, name: str, batch: torch.Tensor) -> torch.Tensor:
    """The input of conv `name` for `batch`, running the model only that far."""
    conv = dict(model.named_modules())[name]
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen.append(inputs[0])
        raise _StopForwardError

    handle = conv.register_forward_pre_hook(hook)
    try:
        model(batch)
    except _StopForwardError:
        pass
    finally:
        handle.remove()
    return seen[0]


def _refit(
    student: NanoDet,
    name: str,
    targets: Sequence[torch.Tensor],
    batches: Sequence[torch.Tensor],
    settings: ReconstructSettings,
    cells: Sequence[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Ridge regression of one conv; `cells` weight its output positions (per batch)."""
    conv = dict(student.named_modules())[name]
    if conv.groups != 1:
        raise ModelError(f"reconstruct: {name} is a grouped convolution, which is not supported")
    features = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    device = conv.weight.device
    gram = torch.zeros(features + 1, features + 1, dtype=torch.float64, device=device)
    outputs = targets[0].shape[1]
    cross = torch.zeros(features + 1, outputs, dtype=torch.float64, device=device)
    squares, energy = 0.0, 0.0
    for index, (batch, y) in enumerate(zip(batches, targets, strict=True)):
        rows = with_ones(patches(conv, _input_of(student, name, batch)))
        wanted = y.permute(0, 2, 3, 1).reshape(-1, outputs).double()
        weight = rows[:, -1:] if cells is None else cells[index].reshape(-1, 1).double()
        gram += (rows * weight).T @ rows
        cross += (rows * weight).T @ wanted
        squares += float((weight * wanted.square()).sum())
        centred = wanted - (weight * wanted).sum(0) / weight.sum()
        energy += float((weight * centred.square()).sum())
    before = _error(gram, cross, weight_matrix(conv), squares, energy)
    solved = ridge_solve(gram, cross, settings.ridge)
    after = _error(gram, cross, solved, squares, energy)
    if after < before:
        set_weight_matrix(conv, solved)
    return {"before": round(before, 5), "after": round(min(after, before), 5)}


def _fit_output(
    student: NanoDet,
    name: str,
    targets: Sequence[torch.Tensor],
    batches: Sequence[torch.Tensor],
    classes: int,
    floor: float,
) -> dict[str, float]:
    """Fit an output 1x1 conv to the teacher's class probabilities and box distributions
    by L-BFGS on their KL divergences (convex in the conv's weights), from its current
    weights; kept only if the objective falls."""
    conv = dict(student.named_modules())[name]
    rows = torch.cat([patches(conv, _input_of(student, name, batch)) for batch in batches])
    wanted = torch.cat([y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]) for y in targets])
    weight = conv.weight.detach().flatten(1).clone().requires_grad_(True)
    bias = conv.bias.detach().clone().requires_grad_(True)
    objective = _OutputObjective(rows, wanted, classes, floor)
    with torch.enable_grad():
        before = float(objective(weight, bias).detach())
        optimizer = torch.optim.LBFGS(
            [weight, bias], max_iter=OUTPUT_FIT_ITERATIONS, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = objective(weight, bias)
            value.backward()
            return value

        optimizer.step(closure)
        after = float(objective(weight, bias).detach())
    if after < before:
        conv.weight.copy_(weight.detach().view_as(conv.weight))
        conv.bias.copy_(bias.detach())
    return {"objective_before": round(before, 5), "objective_after": round(min(after, before), 5)}


class _OutputObjective:
    """Class KL (Bernoulli) and box KL (per side) of logits X W^T + b from the teacher's,
    each cell weighted by the teacher's objectness (the class term plus `floor`)."""

    def __init__(
        self, rows: torch.Tensor, wanted: torch.Tensor, classes: int, floor: float
    ) -> None:
        self.rows = rows
        self.classes = classes
        self.target_prob = wanted[:, :classes].sigmoid()
        entropy = F.binary_cross_entropy_with_logits(
            wanted[:, :classes], self.target_prob, reduction="none"
        ).sum(1)
        self.entropy = entropy
        bins = (wanted.shape[1] - classes) // 4
        self.target_dist = wanted[:, classes:].unflatten(-1, (4, bins)).log_softmax(-1)
        self.objectness = self.target_prob.amax(1)
        self.cell_weight = self.objectness + floor

    def __call__(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        logits = self.rows @ weight.T + bias
        cls, box = logits[:, : self.classes], logits[:, self.classes :]
        kl_cls = (
            F.binary_cross_entropy_with_logits(cls, self.target_prob, reduction="none").sum(1)
            - self.entropy
        )
        dist = box.unflatten(-1, self.target_dist.shape[1:]).log_softmax(-1)
        kl_box = (self.target_dist.exp() * (self.target_dist - dist)).sum(-1).mean(-1)
        class_term = (kl_cls * self.cell_weight).sum() / self.cell_weight.sum()
        box_term = (kl_box * self.objectness).sum() / self.objectness.sum().clamp(min=1e-6)
        return class_term + box_term


def _error(
    gram: torch.Tensor, cross: torch.Tensor, weights: torch.Tensor, squares: float, energy: float
) -> float:
    """Relative squared error ||XW - Y||^2 / ||Y - mean(Y)||^2 from the sufficient statistics."""
    quadratic = float((weights * (gram @ weights)).sum() - 2 * (weights * cross).sum())
    return max(0.0, quadratic + squares) / max(energy, 1e-12)


def _produce(
    context: BuildContext, parent: ModelRef, settings: ReconstructSettings, folder: Path
) -> dict[str, Any]:
    student = torch_model(parent.manifest, "reconstruction")
    record = parent.manifest.folder / KEPT
    if record.is_file():
        kept = json.loads(record.read_text())
    else:  # not pruned: every channel kept, and the refit must leave the model as it is
        kept = {
            n: list(range(m.out_channels))
            for n, m in student.named_modules()
            if isinstance(m, nn.Conv2d)
        }
    images = context.calibration(settings.calibration_frames, parent.manifest)
    bar = tqdm(desc="reconstruct", unit="layer", disable=not context.progress)

    def advance(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    report = reconstruct(
        student, context.teacher(), kept, list(images), settings, advance, context.device
    )
    bar.close()
    write_json(folder / KEPT, kept)
    write_model(
        student,
        folder,
        parent.manifest,
        "reconstructed",
        dynamic_batch=context.recipe.export.dynamic_batch,
    )
    return report.to_dict()


STAGE = Stage(
    section="reconstruct",
    settings=ReconstructSettings,
    produce=_produce,
    variants=(Variant(STUDENT, "reconstruct", "reconstructed"),),
    makes_student=True,
)
