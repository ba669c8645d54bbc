"""The network input trimmed to the camera's frames: the letterbox padding the model no
longer computes on.

A 4:3 frame letterboxed into NanoDet-g's 416x416 input fills 416x312 of it; a quarter of
every frame's MACs go to padding. Trimming the padded side alone changes where the content
sits, and a shift that is not a multiple of the model's largest stride moves every cell of
the coarsest level against the scene: the original at 416x384 (a 16-row shift) agreed with
itself at 416x416 only 0.80 / 0.82 mAP / mAP@.5 on vtest's held-out frames, at 416x352 (a
32-row shift) 0.993 / 0.995 (docs/benchmarks.md). So each side is trimmed by twice a
multiple of that stride, and only as far as the content at the original's scale still
fits: every frame then lands on the same grid, at the same scale, as in the original.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressed_perception.compress.artifacts import torch_model, write_model
from compressed_perception.compress.stage import STUDENT, BuildContext, ModelRef, Stage, Variant
from compressed_perception.errors import ConfigError
from compressed_perception.models.nanodet import with_input_size
from compressed_perception.runtime.manifest import FITTED_FROM
from compressed_perception.runtime.preprocess import same_grid

Size = tuple[int, int]  # (width, height) of a frame


@dataclass(frozen=True)
class FitInputSettings:
    # frame sizes (width, height) the model must see as the original does, besides the
    # training frames': the other cameras of a fleet
    sizes: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        for size in self.sizes:
            if len(size) != 2 or min(size) < 1:
                raise ConfigError(
                    f"fit_input sizes: {list(size)} is not a [width, height] of positive pixels"
                )


def fitted_size(
    input_size: tuple[int, int], stride: int, frames: Iterable[Size]
) -> tuple[int, int]:
    """The smallest (height, width) that letterboxes every frame size as `input_size` does,
    content moved by whole multiples of `stride`; `input_size` itself where none is smaller."""
    height, width = input_size
    sizes = set(frames)
    if not sizes:
        raise ConfigError("fit_input: no frame sizes to fit the input to")
    candidates = [
        (h, w)
        for h in range(height, 0, -2 * stride)
        for w in range(width, 0, -2 * stride)
        if all(same_grid(input_size, (h, w), stride, size) for size in sizes)
    ]
    return min(candidates, key=lambda hw: (hw[0] * hw[1], -hw[1]))


def _produce(
    context: BuildContext, parent: ModelRef, settings: FitInputSettings, folder: Path
) -> dict[str, Any]:
    model = torch_model(parent.manifest, "fitting the input")
    before = model.config.input_size
    sizes = sorted({*((f.shape[1], f.shape[0]) for f in context.train_frames), *settings.sizes})
    stride = max(model.config.strides)
    after = fitted_size(before, stride, sizes)
    write_model(
        with_input_size(model, after),
        folder,
        parent.manifest,
        "fitted",
        dynamic_batch=context.recipe.export.dynamic_batch,
        architecture={FITTED_FROM: {"input_size": list(before), "stride": stride}},
    )
    return {
        "input_before": list(before),
        "input_after": list(after),
        "frame_sizes": [list(s) for s in sizes],
        "area_share": round(after[0] * after[1] / (before[0] * before[1]), 4),
    }


STAGE = Stage(
    section="fit_input",
    settings=FitInputSettings,
    produce=_produce,
    variants=(Variant(STUDENT, "fit_input", "fitted"),),
    makes_student=True,
    replaces_original=True,
)
