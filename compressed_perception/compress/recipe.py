"""The build recipe: one YAML file naming the source model, the data and every stage's settings.

Unknown keys are errors, not ignored: a misspelt setting that silently falls back to its
default would build a different model than the one the recipe describes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compressed_perception.compress.distill import DistillSettings
from compressed_perception.compress.prune import PruneSettings
from compressed_perception.compress.quantize import OrtSettings, QdqSettings
from compressed_perception.compress.tensorrt import EngineSettings
from compressed_perception.datasets import HELD_OUT_FRAMES, TRAIN_FRAMES, VTEST, FrameSource
from compressed_perception.errors import ConfigError

SECTIONS = (
    "source",
    "train",
    "evaluate",
    "prune",
    "distill",
    "export",
    "quantize_qdq",
    "quantize_ort",
    "tensorrt",
    "bench",
    "labels",
    "quick",
)


@dataclass(frozen=True)
class ExportSettings:
    dynamic_batch: bool = False  # one engine serving several cameras per call


@dataclass(frozen=True)
class BenchSettings:
    width: int = 640
    height: int = 480
    iterations: int = 150

    def __post_init__(self) -> None:
        if self.width < 32 or self.height < 32 or self.iterations < 1:
            raise ConfigError(f"bench: {self} needs width, height >= 32 and iterations >= 1")


@dataclass(frozen=True)
class LabelSettings:
    """A labelled set (COCO JSON, categories matched by name) for real mAP beside agreement."""

    coco: str
    images: str  # folder holding the JSON's `file_name`s

    def __post_init__(self) -> None:
        if not self.coco or not self.images:
            raise ConfigError("labels: both coco (a COCO JSON) and images (a folder) are needed")


@dataclass(frozen=True)
class Recipe:
    source: str = ""  # model manifest; "" is the packaged FP32 NanoDet-g
    train: FrameSource = field(
        default_factory=lambda: FrameSource(start=TRAIN_FRAMES.start, stop=TRAIN_FRAMES.stop)
    )
    evaluate: FrameSource = field(
        default_factory=lambda: FrameSource(start=HELD_OUT_FRAMES.start, stop=HELD_OUT_FRAMES.stop)
    )
    prune: PruneSettings | None = field(default_factory=PruneSettings)
    distill: DistillSettings | None = field(default_factory=DistillSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    quantize_qdq: QdqSettings | None = field(default_factory=QdqSettings)
    quantize_ort: OrtSettings | None = field(default_factory=OrtSettings)
    tensorrt: EngineSettings | None = field(default_factory=EngineSettings)
    bench: BenchSettings = field(default_factory=BenchSettings)
    labels: LabelSettings | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            name: (None if value is None else _plain(value))
            for name, value in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        }


_TYPES: dict[str, type] = {
    "train": FrameSource,
    "evaluate": FrameSource,
    "prune": PruneSettings,
    "distill": DistillSettings,
    "export": ExportSettings,
    "quantize_qdq": QdqSettings,
    "quantize_ort": OrtSettings,
    "tensorrt": EngineSettings,
    "bench": BenchSettings,
    "labels": LabelSettings,
}
OPTIONAL = ("prune", "distill", "quantize_qdq", "quantize_ort", "tensorrt", "labels")


def load_recipe(path: Path, quick: bool = False) -> Recipe:
    """Read a recipe; `quick` merges its `quick:` section over the rest (for tests and CI)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: build recipe not found") from exc
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: unreadable build recipe ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return parse_recipe(data, str(path), quick, base=path.parent)


def parse_recipe(
    data: Mapping[str, Any], where: str, quick: bool = False, base: Path | None = None
) -> Recipe:
    """`base`: the folder relative paths in the recipe are relative to."""
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown sections {sorted(unknown)} (known: {SECTIONS})")
    merged = dict(data)
    overrides = merged.pop("quick", None) or {}
    if quick:
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: quick must be a mapping of section overrides")
        merged = _merge(merged, overrides, f"{where} quick")
    values = {name: _section(name, value, where) for name, value in merged.items()}
    recipe = Recipe(**values)
    return recipe if base is None else _resolve(recipe, base)


def _resolve(recipe: Recipe, base: Path) -> Recipe:
    def path(text: str) -> str:
        return text if text in ("", VTEST) or Path(text).is_absolute() else str(base / text)

    labels = recipe.labels
    if labels is not None:
        labels = LabelSettings(coco=path(labels.coco), images=path(labels.images))
    return dataclasses.replace(
        recipe,
        labels=labels,
        source=path(recipe.source),
        train=dataclasses.replace(recipe.train, source=path(recipe.train.source)),
        evaluate=dataclasses.replace(recipe.evaluate, source=path(recipe.evaluate.source)),
    )


def _merge(base: dict[str, Any], overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = set(overrides) - (set(SECTIONS) - {"quick"})
    if unknown:
        raise ConfigError(f"{where}: unknown sections {sorted(unknown)}")
    merged = dict(base)
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(name), dict):
            merged[name] = {**base[name], **value}
        else:
            merged[name] = value
    return merged


def _section(name: str, value: Any, where: str) -> Any:
    if name == "source":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: source must be a manifest path (string)")
        return value
    if value is None:
        if name not in OPTIONAL:
            raise ConfigError(f"{where}: section {name} cannot be null")
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: section {name} must be a mapping, got {value!r}")
    kind = _TYPES[name]
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(value) - known
    if unknown:
        raise ConfigError(
            f"{where}: {name}: unknown keys {sorted(unknown)} (known: {sorted(known)})"
        )
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    try:
        return kind(**converted)
    except TypeError as exc:
        raise ConfigError(f"{where}: {name}: {exc}") from exc


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
