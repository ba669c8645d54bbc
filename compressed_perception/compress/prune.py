"""Structured channel pruning that starts as close to the original model as it can.

Whole output channels are removed, and everything that consumes them (the next
convolution, a concatenation, the neck's sums) shrinks with them, so the result is a
smaller dense network that every backend runs faster, not a sparse one. torch-pruning's
dependency graph finds the coupled layers; this module decides what to remove:

- a channel's importance is the error its removal causes in the convolutions that read it,
  measured on calibration frames with its mean folded into their bias: the batch norm is
  folded into these weights, so a weight's norm says little about what a channel carries;
- each removed channel's mean contribution is folded into the consumers' biases;
- how much each group loses comes from a sensitivity scan (the output discrepancy from
  the original when only that group is pruned, at a few ratios) under a MACs budget,
  not from one ratio for every layer.

The head's output convolutions are never pruned: their channels are the classes and box
bins of the I/O contract.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from compressed_perception.atomic import write_json
from compressed_perception.compress.artifacts import torch_model, write_model
from compressed_perception.compress.linear import (
    gram,
    ridge_solve,
    set_weight_matrix,
    weight_matrix,
)
from compressed_perception.compress.objective import discrepancy
from compressed_perception.compress.stage import (
    STUDENT,
    BuildContext,
    ModelRef,
    Stage,
    Table,
    Variant,
)
from compressed_perception.compress.upstream import Upstream
from compressed_perception.errors import ConfigError, check_choice
from compressed_perception.models.hooks import hooked
from compressed_perception.models.nanodet import NanoDet

IMPORTANCE = ("reconstruction", "magnitude")
ALLOCATION = ("sensitivity", "uniform", "filled")
ROUNDING = (1, 2, 4, 8, 16, 32)
SEEN = 0.35  # a score the runtime reports: an output level producing one is in use
RIDGE = 1e-3  # regularisation of a local refit, relative to the mean input variance
BATCH = 4


@dataclass(frozen=True)
class PruneSettings:
    macs: float = 0.6  # budget: the pruned model's MACs as a share of the original's
    importance: str = "reconstruction"  # or magnitude (weight L2 norm), for comparison
    # uniform: one share for all groups; filled: that share, then what its rounding left
    # under the budget given back where the scan found most harm; sensitivity: per group
    # from the scan alone
    allocation: str = "filled"
    scan_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)  # shares each group is scanned at
    max_ratio: float = 0.75  # most of any group's channels that may go
    calibration_frames: int = 32  # training frames for importance and the scan
    protect: tuple[str, ...] = ()  # convolutions kept whole, besides the head's outputs
    # keep whole the head of any output level where the original detects nothing on the
    # calibration frames: its loss there could not be seen, so it is not spent
    protect_unseen_levels: bool = True
    # every pruned group keeps a multiple of this many channels: CPU INT8 kernels block
    # channels by 16 (VNNI) and 8 (AVX2); at equal MACs, 16 ran 4-7 % faster than 8 (docs)
    round_to: int = 16

    def __post_init__(self) -> None:
        if not 0.05 <= self.macs < 1.0:
            raise ConfigError(f"prune macs: {self.macs} is outside [0.05, 1)")
        check_choice("prune importance", self.importance, IMPORTANCE)
        check_choice("prune allocation", self.allocation, ALLOCATION)
        if not 0.0 < self.max_ratio <= 0.9:
            raise ConfigError(f"prune max_ratio: {self.max_ratio} is outside (0, 0.9]")
        if not self.scan_ratios or not all(0 < r <= self.max_ratio for r in self.scan_ratios):
            raise ConfigError(
                f"prune scan_ratios: {list(self.scan_ratios)} must be in (0, max_ratio]"
            )
        check_choice("prune round_to", self.round_to, ROUNDING)
        if self.calibration_frames < BATCH:
            raise ConfigError(
                f"prune calibration_frames: {self.calibration_frames} is too few (>= {BATCH})"
            )


@dataclass(frozen=True)
class PruneReport:
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    # group (its root convolution) -> channels before and after
    channels: dict[str, list[int]] = field(default_factory=dict)
    # group -> output discrepancy when only that group is pruned, per scanned ratio
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    unseen_levels: list[int] = field(default_factory=list)  # levels whose heads were kept
    allocation: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_ratio": round(self.params_after / self.params_before, 4),
            "macs_ratio": round(self.macs_after / self.macs_before, 4),
            "channels": self.channels,
            "sensitivity": self.sensitivity,
            "unseen_levels": self.unseen_levels,
            "allocation": self.allocation,
        }


@dataclass
class Group:
    """Output channels that must go together, and where each one is read.

    `consumers` maps a convolution to the input channel that each of the group's channels
    is in it (a concatenation shifts them); `producers` are the convolutions whose output
    channels these are (the neck's sums couple three).
    """

    root: str
    size: int
    producers: list[str]
    consumers: dict[str, np.ndarray]


@dataclass(frozen=True)
class Pruned:
    """What `prune` did: the report, and the original output channels each conv kept."""

    report: PruneReport
    kept: dict[str, list[int]]


def prune(
    model: NanoDet, settings: PruneSettings, images: Sequence[np.ndarray], device: str = "cpu"
) -> Pruned:
    """Prune `model` in place to `settings.macs` of its MACs, calibrated on `images`.

    `images` are letterboxed uint8 HWC frames of the training range. The scan runs on
    `device`; the pruned model is returned on the CPU.
    """
    if len(images) < BATCH:
        raise ConfigError(f"prune: {len(images)} calibration frames, at least {BATCH} needed")
    model.cpu().eval()
    example = torch.zeros(1, 3, *model.config.input_size)
    macs_before, params_before = tp.utils.count_ops_and_params(model, example)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    model.to(device)
    batches = [batch.to(device) for batch in normalized_batches(model, images)]
    unseen = unseen_levels(model, batches) if settings.protect_unseen_levels else []
    protect = (*settings.protect, *(f"head.convs.{level}.conv" for level in unseen))
    model.cpu()
    groups = channel_groups(model, graph, protect)
    costs = _MacsModel(model, groups, float(macs_before))
    floor = costs.macs(_limits(groups, settings))
    if floor > settings.macs * costs.macs({}):
        raise ConfigError(_budget_error(settings, costs, groups))
    model.to(device)
    stats = _Statistics.measure(model, groups, batches)
    ranking = {g.root: _ranking(model, g, stats, settings.importance) for g in groups}
    # scanned either way: the report shows where the model is fragile, whichever allocates
    sensitivity = scan(model, groups, ranking, stats, batches, settings)
    if settings.allocation == "sensitivity":
        removed = _allocate(groups, costs, sensitivity, settings)
    else:
        removed = _uniform(groups, costs, settings)
        if settings.allocation == "filled":
            removed = _fill(groups, costs, sensitivity, removed, settings)
    plan = {g.root: ranking[g.root][: removed[g.root]] for g in groups}
    model.cpu()
    stats = stats.to("cpu")
    kept = _apply(model, graph, groups, plan, stats)
    macs_after, params_after = tp.utils.count_ops_and_params(model, example)
    channels = {g.root: [g.size, g.size - removed[g.root]] for g in groups}
    report = PruneReport(
        int(params_before),
        int(params_after),
        int(macs_before),
        int(macs_after),
        channels,
        sensitivity,
        unseen,
        settings.allocation,
    )
    return Pruned(report, kept)


def unseen_levels(model: NanoDet, batches: Sequence[torch.Tensor]) -> list[int]:
    """Output levels where the model detects nothing (no score >= SEEN) on these frames."""
    peaks = [0.0] * len(model.head.preds)
    classes = model.config.num_classes
    with torch.no_grad():
        for batch in batches:
            for level, (logits, _box) in enumerate(model(batch)):
                peaks[level] = max(peaks[level], float(logits[:, :classes].sigmoid().max()))
    return [level for level, peak in enumerate(peaks) if peak < SEEN]


def channel_groups(
    model: NanoDet, graph: tp.DependencyGraph, protect: Sequence[str] = ()
) -> list[Group]:
    """Every prunable group of output channels, in the graph's order."""
    modules = dict(model.named_modules())
    unknown = [name for name in protect if not isinstance(modules.get(name), nn.Conv2d)]
    if unknown:
        raise ConfigError(f"prune protect: no convolution {unknown} in the model")
    ignored = [*model.head.preds, *(modules[name] for name in protect)]
    names = {module: name for name, module in modules.items()}
    groups = []
    for found in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d]):
        root = found[0].dep.target.module
        full = graph.get_pruning_group(
            root, tp.prune_conv_out_channels, list(range(root.out_channels))
        )
        producers, consumers = [], {}
        for item in full.items:
            layer = item.dep.layer
            if not isinstance(layer, nn.Conv2d):
                continue
            order = np.argsort(np.asarray(item.root_idxs))
            if item.dep.pruning_fn == tp.prune_conv_out_channels:
                producers.append(names[layer])
            elif item.dep.pruning_fn == tp.prune_conv_in_channels:
                consumers[names[layer]] = np.asarray(item.idxs)[order]
        groups.append(Group(names[root], root.out_channels, producers, consumers))
    return groups


def normalized_batches(model: NanoDet, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Calibration frames as the network sees them, in batches of `BATCH`."""
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std).view(1, 3, 1, 1)
    stacked = torch.from_numpy(np.ascontiguousarray(np.stack(images)))
    x = (stacked.float().permute(0, 3, 1, 2) - mean) / std
    return list(x.split(BATCH))


class _Statistics:
    """Per consumer convolution: its input channels' means, and per input channel the
    squared error its removal (mean folded into the bias) causes in the conv's output,
    relative to that output's own energy."""

    def __init__(self) -> None:
        self.means: dict[str, torch.Tensor] = {}
        self.errors: dict[str, torch.Tensor] = {}
        self.grams: dict[str, torch.Tensor] = {}  # of the input patches plus a ones column

    def to(self, device: str) -> _Statistics:
        moved = _Statistics()
        moved.means = {k: v.to(device) for k, v in self.means.items()}
        moved.errors = {k: v.to(device) for k, v in self.errors.items()}
        moved.grams = {k: v.to(device) for k, v in self.grams.items()}
        return moved

    @classmethod
    def measure(
        cls, model: NanoDet, groups: Sequence[Group], batches: Sequence[torch.Tensor]
    ) -> _Statistics:
        consumers = sorted({name for g in groups for name in g.consumers})
        stats = cls()
        sums = _hooked_pass(model, consumers, batches, _channel_sums)
        stats.means = {name: total / count for name, (total, count) in sums.items()}

        def removal_error(
            name: str, conv: nn.Conv2d, x: torch.Tensor, out: torch.Tensor
        ) -> tuple[torch.Tensor, ...]:
            centred = x - stats.means[name].view(1, -1, 1, 1)
            energy = (out - out.mean(dim=(0, 2, 3), keepdim=True)).square().sum()
            return _removal_error(conv, centred), energy, gram(conv, x)

        totals = _hooked_pass(model, consumers, batches, removal_error)
        stats.errors = {name: error / energy for name, (error, energy, _) in totals.items()}
        stats.grams = {name: matrix for name, (_, _, matrix) in totals.items()}
        return stats


def _channel_sums(
    _name: str, _conv: nn.Conv2d, x: torch.Tensor, _out: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    return x.sum(dim=(0, 2, 3)), torch.tensor(float(x.shape[0] * x.shape[2] * x.shape[3]))


def _removal_error(conv: nn.Conv2d, centred: torch.Tensor) -> torch.Tensor:
    """Per input channel i: ||conv(x_i - mean_i, W[:, i])||^2, each channel alone.

    The energy of a convolution's output is its kernel's autocorrelation weighted by the
    input's autocorrelation, over the (2k - 1)^2 relative shifts of a k x k kernel; both
    are cheap, where convolving every channel separately would cost a full layer. A
    strided layer samples one position in stride^2 of them.
    """
    kh, kw = conv.kernel_size
    stride = conv.stride[0] * conv.stride[1]
    total = torch.zeros(conv.in_channels, device=centred.device)
    height, width = centred.shape[2:]
    for dy in range(-(kh - 1), kh):
        for dx in range(-(kw - 1), kw):
            a = centred[:, :, max(0, dy) : height + min(0, dy), max(0, dx) : width + min(0, dx)]
            b = centred[:, :, max(0, -dy) : height + min(0, -dy), max(0, -dx) : width + min(0, -dx)]
            signal = (a * b).sum(dim=(0, 2, 3))  # (cin,)
            w1 = conv.weight[:, :, max(0, -dy) : kh + min(0, -dy), max(0, -dx) : kw + min(0, -dx)]
            w2 = conv.weight[:, :, max(0, dy) : kh + min(0, dy), max(0, dx) : kw + min(0, dx)]
            kernel = (w1 * w2).sum(dim=(0, 2, 3))  # (cin,)
            total += kernel * signal
    return total / stride


# (conv name, conv, its input, its output) -> values summed over batches
Measure = Callable[[str, nn.Conv2d, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


def _hooked_pass(
    model: NanoDet, names: Sequence[str], batches: Sequence[torch.Tensor], measure: Measure
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Sum `measure(name, conv, input, output)` over every batch for each named conv."""
    modules = dict(model.named_modules())
    totals: dict[str, tuple[torch.Tensor, ...]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(conv: nn.Conv2d, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            value = measure(name, conv, inputs[0], out)
            previous = totals.get(name)
            totals[name] = (
                value
                if previous is None
                else tuple(a + b for a, b in zip(previous, value, strict=True))
            )

        return record

    with hooked((modules[name], hook(name)) for name in names), torch.no_grad():
        for batch in batches:
            model(batch)
    return totals


def _ranking(model: NanoDet, group: Group, stats: _Statistics, importance: str) -> list[int]:
    """The group's channels, least important first."""
    if importance == "magnitude":
        modules = dict(model.named_modules())
        weights = [modules[name].weight.detach() for name in group.producers]
        scores = sum(w.flatten(1).square().sum(1) for w in weights)
    else:
        scores = sum(
            stats.errors[name][torch.from_numpy(index)] for name, index in group.consumers.items()
        )
    return [int(i) for i in torch.argsort(torch.as_tensor(scores), stable=True)]


def scan(
    model: NanoDet,
    groups: Sequence[Group],
    ranking: dict[str, list[int]],
    stats: _Statistics,
    batches: Sequence[torch.Tensor],
    settings: PruneSettings,
) -> dict[str, dict[str, float]]:
    """Output discrepancy from the original when one group alone loses each scanned share.

    A masked copy differs from the original in the group's consumers alone, so what runs
    before them is replayed from the original's passes (`Upstream`), not computed again.
    """
    upstream = Upstream(model, batches[0][:1], [list(g.consumers) for g in groups])
    with torch.no_grad():
        reference = [upstream.record(model, batch) for batch in batches]
    table: dict[str, dict[str, float]] = {}
    for group in groups:
        row = {}
        for ratio in settings.scan_ratios:
            count = _rounded(group.size, ratio, settings.round_to)
            masked = copy.deepcopy(model)
            _refit_and_mask(masked, group, ranking[group.root][:count], stats)
            row[f"{ratio:g}"] = _mean_discrepancy(
                masked, list(group.consumers), upstream, reference
            )
        table[group.root] = row
    return table


def _mean_discrepancy(
    model: NanoDet, changed: Sequence[str], upstream: Upstream, reference: Sequence[object]
) -> float:
    total = 0.0
    with torch.no_grad():
        for index, teacher in enumerate(reference):
            found = upstream.run(model, changed, index)
            terms = discrepancy(teacher, found)  # type: ignore[arg-type]
            total += float(sum(terms.values()))
    return round(total / len(reference), 6)


def _fold_and_mask(
    model: NanoDet, group: Group, channels: Sequence[int], stats: _Statistics
) -> None:
    """Remove `channels` from the group's consumers in effect: their mean contribution goes
    into each consumer's bias, their weights to zero. Removal itself then changes nothing."""
    with torch.no_grad():
        for name, conv, inputs in _removed_inputs(model, group, channels):
            mean = stats.means[name][inputs]
            kernel_sums = conv.weight[:, inputs].sum(dim=(2, 3))  # (cout, removed)
            conv.bias += kernel_sums @ mean
            conv.weight[:, inputs] = 0.0


def _refit_and_mask(
    model: NanoDet, group: Group, channels: Sequence[int], stats: _Statistics
) -> None:
    """Remove `channels` in effect and refit each consumer, alone, on its other inputs by
    least squares from its input statistics: what reconstruction will recover of this
    group's loss, so the scan prices a group by the damage that remains."""
    with torch.no_grad():
        for name, conv, gone in _removed_inputs(model, group, channels):
            taps = conv.kernel_size[0] * conv.kernel_size[1]
            removed = (gone[:, None] * taps + torch.arange(taps)).flatten()
            matrix = stats.grams[name]
            keep = torch.ones(matrix.shape[0], dtype=torch.bool, device=matrix.device)
            keep[removed.to(matrix.device)] = False
            weights = weight_matrix(conv)
            refitted = torch.zeros_like(weights)
            refitted[keep] = ridge_solve(matrix[keep][:, keep], matrix[keep] @ weights, RIDGE)
            set_weight_matrix(conv, refitted)


def _removed_inputs(
    model: NanoDet, group: Group, channels: Sequence[int]
) -> Iterator[tuple[str, nn.Conv2d, torch.Tensor]]:
    """Each consumer of the group, by name, and the indices of its input channels that
    removing `channels` takes away (none at all when `channels` is empty)."""
    if not channels:
        return
    modules = dict(model.named_modules())
    for name, index in group.consumers.items():
        yield name, modules[name], torch.from_numpy(index[list(channels)])


def _apply(
    model: NanoDet,
    graph: tp.DependencyGraph,
    groups: Sequence[Group],
    plan: dict[str, list[int]],
    stats: _Statistics,
) -> dict[str, list[int]]:
    """Fold every removed channel into the biases, then remove them all; returns the
    original output channels each producer keeps (every conv's, pruned or not)."""
    for group in groups:
        _fold_and_mask(model, group, plan[group.root], stats)
    modules = dict(model.named_modules())
    convs = {name: m for name, m in modules.items() if isinstance(m, nn.Conv2d)}
    kept = {name: list(range(conv.out_channels)) for name, conv in convs.items()}
    for group in groups:
        removed = sorted(plan[group.root])
        if not removed:
            continue
        graph.get_pruning_group(modules[group.root], tp.prune_conv_out_channels, removed).prune()
        gone = set(removed)
        for name in group.producers:
            kept[name] = [c for c in kept[name] if c not in gone]
    return kept


def _rounded(size: int, ratio: float, round_to: int) -> int:
    """Channels to remove for `ratio`, keeping a multiple of `round_to` and at least that."""
    keep = max(round_to, math.ceil(size * (1 - ratio) / round_to) * round_to)
    return max(0, size - keep)


def _limits(groups: Sequence[Group], settings: PruneSettings) -> dict[str, int]:
    """The most channels each group may lose."""
    return {g.root: _rounded(g.size, settings.max_ratio, settings.round_to) for g in groups}


class _MacsModel:
    """MACs of the network as a function of how many channels each group loses."""

    def __init__(self, model: NanoDet, groups: Sequence[Group], total: float) -> None:
        modules = dict(model.named_modules())
        self.convs: dict[str, tuple[float, int, int, int]] = {}  # pixels*k*k, cin, cout, groups
        sizes: dict[str, int] = {}

        def record(name: str) -> Callable[..., None]:
            def hook(_conv: nn.Conv2d, _inputs: object, out: torch.Tensor) -> None:
                sizes[name] = out.shape[2] * out.shape[3]

            return hook

        convs = {n: m for n, m in modules.items() if isinstance(m, nn.Conv2d)}
        with hooked((m, record(n)) for n, m in convs.items()), torch.no_grad():
            model(torch.zeros(1, 3, *model.config.input_size))
        for name, conv in convs.items():
            kernel = conv.kernel_size[0] * conv.kernel_size[1]
            self.convs[name] = (
                sizes[name] * kernel,
                conv.in_channels,
                conv.out_channels,
                conv.groups,
            )
        self.out_group = {p: g.root for g in groups for p in g.producers}
        self.in_groups = {name: [g.root for g in groups if name in g.consumers] for name in convs}
        # what the convolutions leave of the whole count (pooling, sums, resizes), kept as is
        self.other = 0.0
        self.other = total - self.macs({})

    def macs(self, removed: dict[str, int]) -> float:
        total = 0.0
        for name, (pixels, cin, cout, conv_groups) in self.convs.items():
            inputs = cin - sum(removed.get(g, 0) for g in self.in_groups[name])
            outputs = cout - removed.get(self.out_group.get(name, ""), 0)
            total += pixels * inputs * outputs / conv_groups
        return total + self.other


def _uniform(groups: Sequence[Group], costs: _MacsModel, settings: PruneSettings) -> dict[str, int]:
    """The smallest single share, applied to every group, that meets the MACs budget."""
    budget = settings.macs * costs.macs({})
    for step in range(1, 91):
        ratio = min(step / 100, settings.max_ratio)
        removed = {g.root: _rounded(g.size, ratio, settings.round_to) for g in groups}
        if costs.macs(removed) <= budget:
            return removed
        if ratio >= settings.max_ratio:
            break
    raise ConfigError(_budget_error(settings, costs, groups))


def _allocate(
    groups: Sequence[Group],
    costs: _MacsModel,
    sensitivity: dict[str, dict[str, float]],
    settings: PruneSettings,
) -> dict[str, int]:
    """Greedy: repeatedly take the `round_to`-channel step that costs least discrepancy per
    MAC saved, interpolating each group's scanned curve, until the budget is met."""
    budget = settings.macs * costs.macs({})
    limits = _limits(groups, settings)
    curves = _curves(groups, sensitivity, settings.round_to)
    removed = {g.root: 0 for g in groups}
    current = costs.macs(removed)
    while current > budget:
        steps = _steps(
            groups,
            costs,
            curves,
            (removed, current),
            lambda root, count: min(count + settings.round_to, limits[root]),
        )
        if not steps:
            raise ConfigError(_budget_error(settings, costs, groups))
        best = min(steps, key=lambda step: step.price)
        removed, current = best.removed, best.macs
    return removed


def _fill(
    groups: Sequence[Group],
    costs: _MacsModel,
    sensitivity: dict[str, dict[str, float]],
    removed: dict[str, int],
    settings: PruneSettings,
) -> dict[str, int]:
    """Greedy, the other way round: give back the `round_to`-channel step that buys the
    most discrepancy per MAC spent, interpolating each group's scanned curve, while the
    budget still holds it."""
    budget = settings.macs * costs.macs({})
    curves = _curves(groups, sensitivity, settings.round_to)
    current = costs.macs(removed)
    while True:
        steps = _steps(
            groups,
            costs,
            curves,
            (removed, current),
            lambda _root, count: max(count - settings.round_to, 0),
        )
        affordable = [step for step in steps if step.macs <= budget and step.price > 0]
        if not affordable:
            return removed
        best = max(affordable, key=lambda step: step.price)
        removed, current = best.removed, best.macs


@dataclass(frozen=True)
class _Step:
    removed: dict[str, int]
    macs: float
    price: float  # discrepancy it changes per MAC it changes


def _steps(
    groups: Sequence[Group],
    costs: _MacsModel,
    curves: dict[str, Callable[[int], float]],
    start: tuple[dict[str, int], float],
    move: Callable[[str, int], int],
) -> list[_Step]:
    """Every group's next step from `start` (channels removed, its MACs), priced; `move`
    gives a group's new count, and groups it leaves where they are are skipped."""
    removed, current = start
    steps = []
    for group in groups:
        count = removed[group.root]
        moved = move(group.root, count)
        if moved == count:
            continue
        trial = {**removed, group.root: moved}
        macs = costs.macs(trial)
        curve = curves[group.root]
        change = abs(curve(moved) - curve(count)) / max(abs(macs - current), 1e-9)
        steps.append(_Step(trial, macs, change))
    return steps


def _curves(
    groups: Sequence[Group], sensitivity: dict[str, dict[str, float]], round_to: int
) -> dict[str, Callable[[int], float]]:
    return {g.root: _curve(g.size, sensitivity[g.root], round_to) for g in groups}


def _curve(size: int, row: dict[str, float], round_to: int) -> Callable[[int], float]:
    """Discrepancy against channels removed: linear between the scanned points, never
    falling as more channels go, and growing linearly past the last point."""
    points = sorted(
        (_rounded(size, float(r), round_to), max(0.0, value)) for r, value in row.items()
    )
    xs = np.array([0.0, *(p[0] for p in points)])
    ys = np.maximum.accumulate(np.array([0.0, *(p[1] for p in points)]))

    def at(count: int) -> float:
        if count > xs[-1]:
            return float(ys[-1] * count / max(xs[-1], 1.0))
        return float(np.interp(count, xs, ys))

    return at


def _budget_error(settings: PruneSettings, costs: _MacsModel, groups: Sequence[Group]) -> str:
    floor = costs.macs(_limits(groups, settings))
    return (
        f"prune macs: {settings.macs} is below what pruning can reach: at max_ratio "
        f"{settings.max_ratio} in every group the model keeps {floor / costs.macs({}):.3f} "
        "of its MACs (the head's outputs and protected layers stay whole)"
    )


KEPT = "kept.json"  # beside a pruned model: the original output channels each conv kept


def _produce(
    context: BuildContext, parent: ModelRef, settings: PruneSettings, folder: Path
) -> dict[str, Any]:
    model = torch_model(parent.manifest, "pruning")
    images = context.calibration(settings.calibration_frames, parent.manifest)
    original = context.source_counts[1]
    share = _share_of_parent(settings.macs, parent, original)
    result = prune(model, dataclasses.replace(settings, macs=share), list(images), context.device)
    write_json(folder / KEPT, result.kept)
    write_model(
        model,
        folder,
        parent.manifest,
        "pruned",
        dynamic_batch=context.recipe.export.dynamic_batch,
    )
    info = result.report.to_dict()
    if original:
        info["macs_of_original"] = round(result.report.macs_after / original, 4)
    return info


def _share_of_parent(budget: float, parent: ModelRef, original: int | None) -> float:
    """The budget, a share of the original's MACs, as a share of the parent's: they differ
    where an earlier stage (a fitted input) already cut them."""
    if not original or not parent.macs or parent.macs == original:
        return budget
    share = budget * original / parent.macs
    if share >= 1.0:
        raise ConfigError(
            f"prune macs: {budget} of the original's MACs leaves nothing to prune: "
            f"{parent.manifest.name} already has {parent.macs / original:.3f} of them"
        )
    return share


def _tables(info: dict[str, Any]) -> dict[str, Table]:
    sensitivity = info.get("sensitivity") or {}
    ratios = sorted({r for row in sensitivity.values() for r in row}, key=float)
    channels = info.get("channels", {})
    rows = tuple(
        (
            group,
            *(f"{row.get(r, float('nan')):.4f}" for r in ratios),
            "{} -> {}".format(*channels.get(group, ("?", "?"))),
        )
        for group, row in sensitivity.items()
    )
    unseen = info.get("unseen_levels") or []
    note = (
        "Output discrepancy from the original (distillation's objective, on calibration "
        "frames) when only that group loses the given share of its channels, the "
        "convolutions that read them refitted by least squares; and the channels the "
        f"{info.get('allocation', '')} allocation kept under the MACs budget."
        + (
            f" The heads of output levels {unseen} were kept whole: the original detects "
            "nothing there on these frames, so their loss could not be measured."
            if unseen
            else ""
        )
    )
    columns = ("group", *(f"share {r}" for r in ratios), "channels")
    return {"Pruning sensitivity": Table(columns, rows, note)} if rows else {}


STAGE = Stage(
    section="prune",
    settings=PruneSettings,
    produce=_produce,
    variants=(Variant(STUDENT, "prune", "pruned"),),
    makes_student=True,
    revision=2,
    tables=_tables,
)
