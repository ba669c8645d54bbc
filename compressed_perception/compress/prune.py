"""Structured channel pruning of a NanoDet with torch-pruning's dependency graph.

Whole output channels are removed, and everything that consumes them (the next
convolution, a concatenation, the neck's sums) shrinks with them, so the result is a
smaller dense network that every backend runs faster, not a sparse one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from compressed_perception.errors import ConfigError
from compressed_perception.models.nanodet import DeployModel, NanoDet

IMPORTANCE = ("magnitude", "taylor")
MAX_RATIO = 0.9


@dataclass(frozen=True)
class PruneSettings:
    ratio: float = 0.5  # share of prunable channels removed
    importance: str = "magnitude"  # L2 norm of each channel's weights, or first-order Taylor
    global_pruning: bool = False  # rank channels across layers instead of per layer
    protect: tuple[str, ...] = ()  # module names kept whole, besides the head's outputs

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= MAX_RATIO:
            raise ConfigError(f"prune ratio: {self.ratio} is outside (0, {MAX_RATIO}]")
        if self.importance not in IMPORTANCE:
            raise ConfigError(f"prune importance: {self.importance!r} is not one of {IMPORTANCE}")


@dataclass(frozen=True)
class PruneReport:
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    def to_dict(self) -> dict[str, float]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_ratio": round(self.params_after / self.params_before, 4),
            "macs_ratio": round(self.macs_after / self.macs_before, 4),
        }


def prune(
    model: NanoDet, settings: PruneSettings, images: Sequence[np.ndarray] = ()
) -> PruneReport:
    """Prune `model` in place. Taylor importance needs real `images` (letterboxed uint8 HWC).

    The head's output convolutions are never pruned: their channels are the classes and
    box bins of the I/O contract.
    """
    height, width = model.config.input_size
    example = torch.zeros(1, 3, height, width)
    protected = _protected(model, settings.protect)
    before_macs, before_params = tp.utils.count_ops_and_params(model, example)
    importance: tp.importance.Importance
    if settings.importance == "taylor":
        if not images:
            raise ConfigError("prune importance 'taylor' needs calibration images")
        _accumulate_output_gradients(model, images)
        importance = tp.importance.TaylorImportance()
    else:
        importance = tp.importance.MagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        pruning_ratio=settings.ratio,
        global_pruning=settings.global_pruning,
        ignored_layers=protected,
        round_to=8,  # channel counts that vector units and INT8 kernels like
    )
    pruner.step()
    model.zero_grad(set_to_none=True)
    after_macs, after_params = tp.utils.count_ops_and_params(model, example)
    return PruneReport(int(before_params), int(after_params), int(before_macs), int(after_macs))


def _protected(model: NanoDet, names: Sequence[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ConfigError(f"prune protect: no module {unknown} in the model")
    return [*model.head.preds, *(modules[name] for name in names)]


def _accumulate_output_gradients(model: NanoDet, images: Sequence[np.ndarray]) -> None:
    """Label-free first-order Taylor: gradients of the outputs' energy on real frames.

    |w * dE/dw| estimates how much the detector's response E = sum of squared class and
    box logits changes when a channel is removed; no labels are needed for that.
    """
    deploy = DeployModel(model)
    model.zero_grad(set_to_none=True)
    for image in images:
        batch = torch.from_numpy(np.ascontiguousarray(image))[None]
        x = (batch.permute(0, 3, 1, 2).float() - deploy.mean) * deploy.inv_std
        energy = sum((cls.square().sum() + box.square().sum()) for cls, box in model(x))
        energy.backward()
