"""Label-free layer-wise reconstruction of a pruned model from the original, no training.

Every convolution is refitted in forward order by ridge regression: from the inputs it
receives in the pruned model (whose earlier layers are already refitted) to the outputs
the same convolution gives in the original model, on the output channels it kept. Each
layer thereby undoes the error of the layers before it as far as a linear map can. A
layer that was not pruned and whose inputs are exact is left as it is.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from compressed_perception.atomic import write_json
from compressed_perception.compress import upstream
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
from compressed_perception.models.hooks import hooked
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
OUTPUT_FIT_ROWS = 8192  # rows per pass of the output fit's objective


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

    Runs on `device`; the student is returned on the CPU, and the teacher is not moved.
    """
    started = time.perf_counter()
    student.to(device).eval()
    teacher = copy.deepcopy(teacher).to(device).eval()
    frames = list(images)
    if settings.flip:
        frames += [np.ascontiguousarray(image[:, ::-1]) for image in frames]
    batches = [batch.to(device) for batch in normalized_batches(teacher, frames)]
    calls = upstream.calls(student, batches[0][:1])
    order = [name for name in calls if isinstance(student.get_submodule(name), nn.Conv2d)]
    _check_kept(student, teacher, kept, order)
    layers: dict[str, dict[str, float]] = {}
    inputs = _Inputs(student, calls)
    with torch.no_grad(), inputs.replaying(batches):
        targets = _targets(teacher, order[1:], kept, batches)
        weights = _cell_weights(teacher, batches, settings.background_weight)
        for done, name in enumerate(order):
            if done > 0:  # the first conv reads the image itself: its input is exact
                layers[name] = _refit_layer(
                    student, name, inputs, targets.pop(name), weights, settings
                )
            inputs.refitted(name)
            if progress is not None:
                progress(done + 1, len(order))
    student.cpu()
    return ReconstructReport(layers, time.perf_counter() - started)


def _refit_layer(
    student: NanoDet,
    name: str,
    inputs: _Inputs,
    wanted: list[torch.Tensor],
    weights: dict[int, list[torch.Tensor]],
    settings: ReconstructSettings,
) -> dict[str, float]:
    level = _level_of(student, name)
    layer = _refit(student, name, wanted, inputs, settings, weights.get(level))
    if settings.fit_outputs and name == f"head.preds.{level}":
        classes = student.config.num_classes
        floor = min(settings.background_weight, 1.0)
        layer.update(_fit_output(student, name, wanted, inputs, classes, floor))
    return layer


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

    with hooked((modules[name], keep(name)) for name in names):
        for batch in batches:
            teacher(batch)
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


def _input_of(model: nn.Module, name: str, batch: torch.Tensor) -> torch.Tensor:
    """The input of conv `name` for `batch`, running the model only that far."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen.append(inputs[0])
        raise _StopForwardError

    with (
        hooked([(model.get_submodule(name), hook)], pre=True),
        contextlib.suppress(_StopForwardError),
    ):
        model(batch)
    return seen[0]


class _Inputs:
    """The student's input to one conv, batch by batch, without rerunning what is final.

    Convs are refitted in the order they finish, so a module that runs once per pass is
    final once the last conv finishing before it is refitted: all it computes from has
    finished earlier. Its outputs are then captured per batch on the next pass and
    replayed instead of running it, and the passes up to each conv cost a fraction of a
    full one (reconstruction took half the time). Each pass also runs the first batch in
    full and requires the same input: a model that changes a module's output in place
    fails that, and replaying stops for good.
    """

    def __init__(self, model: nn.Module, calls: dict[str, int]) -> None:
        self.model = model
        self.batches: Sequence[torch.Tensor] = ()
        self.final_after: dict[str, list[str]] = {}
        self.ready: list[str] = []  # final, to be captured on the next pass
        last: str | None = None
        for name, count in calls.items():
            if isinstance(model.get_submodule(name), nn.Conv2d):
                last = name
            if count == 1:
                waiting = self.ready if last is None else self.final_after.setdefault(last, [])
                waiting.append(name)
        self.captured: dict[str, dict[int, object]] = {}
        self.kept: dict[str, list[object]] = {}
        self.overrides = upstream.Overrides()
        self.batch: int | None = None  # the batch replayed outputs are for; None: run all
        self.replay = True

    @contextlib.contextmanager
    def replaying(self, batches: Sequence[torch.Tensor]) -> Iterator[_Inputs]:
        self.batches = batches
        try:
            yield self
        finally:
            self._stop()

    def refitted(self, conv: str) -> None:
        self.ready += self.final_after.pop(conv, [])

    def of(self, conv: str) -> Iterator[torch.Tensor]:
        """Yields the input of `conv` for each batch in turn."""
        self._keep_captured()
        captures = [self._capture(name) for name in self.ready] if self.replay else []
        self.ready = []
        try:
            with hooked(captures):
                yield from self._inputs(conv)
        finally:
            self.batch = None

    def _inputs(self, conv: str) -> Iterator[torch.Tensor]:
        for index, batch in enumerate(self.batches):
            self.batch = index
            found = _input_of(self.model, conv, batch)
            if index == 0 and self.kept:
                self.batch = None
                full = _input_of(self.model, conv, batch)
                if not torch.equal(found, full):
                    self._stop()
                found = full
            yield found

    def _capture(self, name: str) -> tuple[nn.Module, Callable[..., None]]:
        outputs = self.captured.setdefault(name, {})

        def hook(_m: nn.Module, _inputs: object, output: object) -> None:
            if self.batch is not None:
                outputs[self.batch] = output

        return self.model.get_submodule(name), hook

    def _keep_captured(self) -> None:
        """Replays every module captured for all batches; an outer one replaces the inner."""
        for name in sorted(self.captured, key=len, reverse=True):
            outputs = self.captured[name]
            if len(outputs) != len(self.batches):
                continue
            prefix = f"{name}."
            self.kept = {k: v for k, v in self.kept.items() if not k.startswith(prefix)}
            self.kept[name] = [outputs[index] for index in range(len(self.batches))]
            module = self.model.get_submodule(name)
            self.overrides.replace(module, functools.partial(self._replayed, name, module.forward))
        self.captured = {}

    def _replayed(self, name: str, forward: Callable[..., object], *args: Any, **kw: Any) -> Any:
        kept = self.kept.get(name)
        return forward(*args, **kw) if self.batch is None or kept is None else kept[self.batch]

    def _stop(self) -> None:
        self.overrides.undo()
        self.kept, self.captured, self.ready, self.replay = {}, {}, [], False


def _refit(
    student: NanoDet,
    name: str,
    targets: Sequence[torch.Tensor],
    inputs: _Inputs,
    settings: ReconstructSettings,
    cells: Sequence[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Ridge regression of one conv; `cells` weight its output positions (per batch)."""
    conv = student.get_submodule(name)
    assert isinstance(conv, nn.Conv2d)
    if conv.groups != 1:
        raise ModelError(f"reconstruct: {name} is a grouped convolution, which is not supported")
    features = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    device = conv.weight.device
    gram = torch.zeros(features + 1, features + 1, dtype=torch.float64, device=device)
    outputs = targets[0].shape[1]
    cross = torch.zeros(features + 1, outputs, dtype=torch.float64, device=device)
    squares, energy = 0.0, 0.0
    for index, (x, y) in enumerate(zip(inputs.of(name), targets, strict=True)):
        rows = with_ones(patches(conv, x), torch.float32)
        wanted = y.permute(0, 2, 3, 1).reshape(-1, outputs)
        weight = rows[:, -1:] if cells is None else cells[index].reshape(-1, 1)
        weighted = rows if cells is None else rows * weight
        # one batch's products in float32, their sum over batches in float64 (docs)
        gram += (weighted.T @ rows).double()
        cross += (weighted.T @ wanted).double()
        wanted, weight = wanted.double(), weight.double()
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
    inputs: _Inputs,
    classes: int,
    floor: float,
) -> dict[str, float]:
    """Fit an output 1x1 conv to the teacher's class probabilities and box distributions
    by L-BFGS on their KL divergences (convex in the conv's weights), from its current
    weights; kept only if the objective falls."""
    conv = student.get_submodule(name)
    assert isinstance(conv, nn.Conv2d)
    rows = torch.cat([patches(conv, x) for x in inputs.of(name)])
    wanted = torch.cat([y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]) for y in targets])
    weight = conv.weight.detach().flatten(1).clone().requires_grad_(True)
    bias = conv.bias.detach().clone().requires_grad_(True)
    objective = _OutputObjective(rows, wanted, classes, floor)
    before = objective.value(weight.detach(), bias.detach())
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=OUTPUT_FIT_ITERATIONS, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        value, weight.grad, bias.grad = objective.value_and_gradient(weight.detach(), bias.detach())
        return value

    optimizer.step(closure)
    after = objective.value(weight.detach(), bias.detach())
    if after < before:
        conv.weight.copy_(weight.detach().view_as(conv.weight))
        conv.bias.copy_(bias.detach())
    return {"objective_before": round(before, 5), "objective_after": round(min(after, before), 5)}


class _OutputObjective:
    """Class KL (Bernoulli) and box KL (per side) of logits X W^T + b from the teacher's,
    each cell weighted by the teacher's objectness (the class term plus `floor`).

    Value and gradient are written out, not left to autograd: the fit was reconstruction's
    costliest part. With p the teacher's probabilities, BCE(x, p) = softplus(x) - p x, and
    a box side's KL is logsumexp(z) - q.z plus a constant, so the terms linear in W are
    summed once here and an evaluation passes over the logits only a few times. It does so
    `chunk` rows at a time, so that those passes read a cache, not memory (docs: the
    elementwise passes over all rows at once took two thirds of the fit).
    """

    def __init__(
        self,
        rows: torch.Tensor,
        wanted: torch.Tensor,
        classes: int,
        floor: float,
        chunk: int = OUTPUT_FIT_ROWS,
    ) -> None:
        self.rows = rows
        self.classes = classes
        self.sides = 4
        self.chunk = chunk
        self.target_prob = wanted[:, :classes].sigmoid()
        target_log = wanted[:, classes:].unflatten(-1, (self.sides, -1)).log_softmax(-1)
        self.target_dist = target_log.exp()
        objectness = self.target_prob.amax(1)
        cell_weight = objectness + floor
        self.class_scale = cell_weight / cell_weight.sum()
        self.box_scale = objectness / (objectness.sum().clamp(min=1e-6) * self.sides)
        entropy = F.binary_cross_entropy_with_logits(
            wanted[:, :classes], self.target_prob, reduction="none"
        ).sum(1)
        negentropy = (self.target_dist * target_log).sum((1, 2))
        self.constant = float(
            (self.box_scale.double() * negentropy).sum()
            - (self.class_scale.double() * entropy).sum()
        )
        target_grad = torch.cat(
            (
                self.target_prob * self.class_scale[:, None],
                self.target_dist.flatten(1) * self.box_scale[:, None],
            ),
            dim=1,
        ).double()
        self.linear_weight = target_grad.T @ rows.double()
        self.linear_bias = target_grad.sum(0)

    def value(self, weight: torch.Tensor, bias: torch.Tensor) -> float:
        nonlinear = torch.zeros((), dtype=torch.float64, device=weight.device)
        for part in self._parts():
            cls, normaliser, _box = self._logits(part, weight, bias)
            nonlinear += self._nonlinear(part, cls, normaliser)
        return float(self._value(nonlinear, weight, bias))

    def value_and_gradient(
        self, weight: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.classes
        grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        nonlinear = torch.zeros((), dtype=torch.float64, device=weight.device)
        for part in self._parts():
            cls, normaliser, box = self._logits(part, weight, bias)
            nonlinear += self._nonlinear(part, cls, normaliser)
            rows = self.rows[part]
            grad_cls = (cls.sigmoid_() - self.target_prob[part]).mul_(self.class_scale[part, None])
            grad_box = box.sub_(normaliser).exp_().sub_(self.target_dist[part])
            grad_box = grad_box.mul_(self.box_scale[part, None, None]).flatten(1)
            grad_weight[:k].addmm_(grad_cls.T, rows)
            grad_weight[k:].addmm_(grad_box.T, rows)
            grad_bias[:k] += grad_cls.sum(0)
            grad_bias[k:] += grad_box.sum(0)
        return self._value(nonlinear, weight, bias), grad_weight, grad_bias

    def _parts(self) -> list[slice]:
        return [slice(s, s + self.chunk) for s in range(0, len(self.rows), self.chunk)]

    def _logits(
        self, part: slice, weight: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class logits, each box side's logsumexp, and box logits, of the rows in `part`;
        each contiguous: elementwise work on a strided half of one output ran at a third of
        the speed."""
        k = self.classes
        rows = self.rows[part]
        cls = torch.addmm(bias[:k], rows, weight[:k].T)
        box = torch.addmm(bias[k:], rows, weight[k:].T).unflatten(-1, (self.sides, -1))
        return cls, box.logsumexp(-1, keepdim=True), box

    def _nonlinear(self, part: slice, cls: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
        """The terms that are not linear in W for the rows in `part`, summed in float64."""
        return (F.softplus(cls).sum(1).double() * self.class_scale[part].double()).sum() + (
            normaliser.sum((1, 2)).double() * self.box_scale[part].double()
        ).sum()

    def _value(
        self, nonlinear: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """From the nonlinear terms, in float64: the linear terms cancel most of them."""
        linear = (self.linear_weight * weight.double()).sum() + (
            self.linear_bias * bias.double()
        ).sum()
        return nonlinear - linear + self.constant


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
        student,
        context.teacher(student.config.input_size),
        kept,
        list(images),
        settings,
        advance,
        context.device,
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
    revision=2,  # products in float32, summed over batches in float64; the output fit chunked
)
