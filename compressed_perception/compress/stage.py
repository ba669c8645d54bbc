"""What a build stage is: the one contract the orchestrator runs every stage through.

A stage module defines its settings (its recipe section), a `produce` function that writes
a complete model folder (files plus manifest) and a `Stage` value; `stages.py` registers
it with one line. The orchestrator derives the stage's cache key, runs it once per
variant, measures what it wrote and lists it in the report, without knowing which stage
it is.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compressed_perception.datasets import load_frames
from compressed_perception.runtime.manifest import Manifest
from compressed_perception.runtime.preprocess import Letterbox

if TYPE_CHECKING:
    from compressed_perception.compress.recipe import Recipe
    from compressed_perception.models.nanodet import NanoDet

STUDENT = "student"  # the model the compression stages have made so far
ORIGINAL = "original"  # the source model, before any stage

Log = Callable[[str], None]


@dataclass(frozen=True)
class Variant:
    """One run of a stage: on which model, cached under which name, measured as which row."""

    parent: str  # STUDENT, ORIGINAL, or the section of the stage whose output it takes
    cache: str  # the stage folder's name and the name hashed into its key
    row: str  # the report's label for what it wrote


@dataclass(frozen=True)
class Table:
    """A table a stage adds to the report (a sensitivity scan, a validation curve)."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    note: str = ""


@dataclass(frozen=True)
class ModelRef:
    """A model the build starts from or made: its manifest, cache key and size."""

    manifest: Manifest
    key: str
    params: int | None
    macs: int | None


@dataclass(frozen=True)
class Stage:
    section: str  # recipe section (null there skips the stage)
    settings: type  # the dataclass the section is parsed into
    # (context, parent model, settings, folder to write) -> info for the report
    produce: Callable[[BuildContext, ModelRef, Any, Path], dict[str, Any]]
    variants: tuple[Variant, ...]
    makes_student: bool = False  # its output is the model later stages start from
    # its output is the source model itself, fed differently (not trained, not pruned):
    # later variants on the original take it
    replaces_original: bool = False
    backend: str = "onnxruntime"  # the runtime backend its output is measured with
    cpu: bool = True  # a CPU artifact, eligible for best.json
    uses_frames: bool = True  # training frames go into the cache key
    revision: int = 1  # raised when the stage's output changes for the same inputs
    # more cache-key inputs, e.g. the machine an engine is built for
    key_extra: Callable[[BuildContext, Any], dict[str, Any]] | None = None
    # why the stage cannot run here (None: it can); a skip is reported, never faked
    unavailable: Callable[[], str | None] | None = None
    tables: Callable[[dict[str, Any]], Mapping[str, Table]] | None = None
    # checks of the parent that run, and are reported, even where the stage cannot run
    check: Callable[[BuildContext, ModelRef, Any], dict[str, Any]] | None = None


@dataclass
class BuildContext:
    """What a running stage may use: recipe, source model, frames, device and earlier outputs."""

    recipe: Recipe
    source: Manifest
    log: Log
    progress: bool
    cache_root: Path = Path("stages")  # where stage folders are kept
    device: str = "cpu"

    @functools.cached_property
    def train_frames(self) -> list[np.ndarray]:
        """Loaded on first need only: a fully cached rerun never reads the video."""
        self.log(f"reading training frames ({self.recipe.train.source})")
        return load_frames(self.recipe.train, minimum=self.recipe.frames_needed())

    def calibration(self, count: int, manifest: Manifest, stop: int | None = None) -> np.ndarray:
        """`count` training frames spread over the range (up to `stop`), letterboxed as at
        runtime for `manifest`'s input size."""
        frames = self.train_frames[:stop]
        picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
        letterbox = Letterbox(manifest.io.width, manifest.io.height)
        batch = np.empty((count, manifest.io.height, manifest.io.width, 3), np.uint8)
        for slot, index in enumerate(picks):
            letterbox(frames[index], name=f"training frame {index}")
            batch[slot] = letterbox.buffer[0]
        return batch

    @functools.cached_property
    def source_counts(self) -> tuple[int | None, int | None]:
        """The source model's params and MACs, counted once for the build and its stages."""
        from compressed_perception.compress.artifacts import counts

        return counts(self.source)

    def teacher(self, input_size: tuple[int, int] | None = None) -> NanoDet:
        """The source model in PyTorch, which reconstruction and distillation need, fed
        `input_size` (a fitted student's) so that its outputs line up with the student's."""
        from compressed_perception.compress.artifacts import torch_model
        from compressed_perception.models.nanodet import with_input_size

        model = torch_model(self.source, "the source model")
        return model if input_size is None else with_input_size(model, input_size)


def settings_dict(settings: Any) -> dict[str, Any]:
    return dataclasses.asdict(settings)
