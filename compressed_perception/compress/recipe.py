"""The build recipe: one YAML file naming the source model, the data and every stage's settings.

Unknown keys are errors, not ignored: a misspelt setting that silently falls back to its
default would build a different model than the one the recipe describes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compressed_perception.compress.stages import STAGES
from compressed_perception.datasets import HELD_OUT_FRAMES, TRAIN_FRAMES, VTEST, FrameSource
from compressed_perception.errors import ConfigError, check_choice

DEVICES = ("auto", "cpu", "cuda")
STAGE_TYPES: dict[str, type] = {stage.section: stage.settings for stage in STAGES}
FIXED = ("source", "device", "train", "evaluate", "export", "bench", "labels")
SECTIONS = (*FIXED, *STAGE_TYPES, "quick")


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


def _default_stages() -> dict[str, Any]:
    return {section: kind() for section, kind in STAGE_TYPES.items()}


@dataclass(frozen=True)
class Recipe:
    source: str = ""  # model manifest; "" is the packaged FP32 NanoDet-g
    device: str = "auto"  # where prune, reconstruct and distill run: auto, cpu or cuda
    train: FrameSource = field(
        default_factory=lambda: FrameSource(start=TRAIN_FRAMES.start, stop=TRAIN_FRAMES.stop)
    )
    evaluate: FrameSource = field(
        default_factory=lambda: FrameSource(start=HELD_OUT_FRAMES.start, stop=HELD_OUT_FRAMES.stop)
    )
    export: ExportSettings = field(default_factory=ExportSettings)
    bench: BenchSettings = field(default_factory=BenchSettings)
    labels: LabelSettings | None = None
    stages: Mapping[str, Any] = field(default_factory=_default_stages)  # None: skipped

    def __post_init__(self) -> None:
        check_choice("device", self.device, DEVICES)

    def stage(self, section: str) -> Any:
        """A stage's settings, or None where the recipe switches it off."""
        return self.stages.get(section)

    def with_stage(self, section: str, settings: Any) -> Recipe:
        return dataclasses.replace(self, stages={**self.stages, section: settings})

    def frames_needed(self) -> int:
        """The most training frames any enabled stage calibrates on."""
        wanted = [
            getattr(settings, "calibration_frames", 1)
            for settings in self.stages.values()
            if settings is not None
        ]
        return max(wanted, default=1)

    def to_dict(self) -> dict[str, Any]:
        fixed = {name: _plain(getattr(self, name)) for name in FIXED}
        return {**fixed, **{name: _plain(value) for name, value in self.stages.items()}}


_TYPES: dict[str, type] = {
    "train": FrameSource,
    "evaluate": FrameSource,
    "export": ExportSettings,
    "bench": BenchSettings,
    "labels": LabelSettings,
    **STAGE_TYPES,
}
OPTIONAL = ("labels", *STAGE_TYPES)


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
    stages = {**_default_stages(), **{k: v for k, v in values.items() if k in STAGE_TYPES}}
    fixed = {k: v for k, v in values.items() if k not in STAGE_TYPES}
    try:
        recipe = Recipe(**fixed, stages=stages)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
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
    if name in ("source", "device"):
        if not isinstance(value, str):
            what = "a manifest path (string)" if name == "source" else "a string"
            raise ConfigError(f"{where}: {name} must be {what}, got {value!r}")
        return value
    if value is None:
        if name not in OPTIONAL:
            raise ConfigError(f"{where}: section {name} cannot be null")
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: section {name} must be a mapping, got {value!r}")
    kind = _TYPES[name]
    hints = typing.get_type_hints(kind)
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(value) - known
    if unknown:
        raise ConfigError(
            f"{where}: {name}: unknown keys {sorted(unknown)} (known: {sorted(known)})"
        )
    converted = {
        key: _typed(item, hints[key], f"{where}: {name}: {key}") for key, item in value.items()
    }
    try:
        return kind(**converted)
    except TypeError as exc:
        raise ConfigError(f"{where}: {name}: {exc}") from exc


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` as the field's declared type, or an error naming the key and that type."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    for option in options:
        converted = _as(value, option)
        if converted is not _MISMATCH:
            return converted
    expected = " or ".join(_type_name(option) for option in options)
    raise ConfigError(f"{where} must be {expected}, got {value!r}")


_MISMATCH = object()


_SCALARS: dict[Any, Callable[[Any], bool]] = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _as(value: Any, hint: Any) -> Any:
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list | tuple):
            return _MISMATCH
        items = [_as(item, typing.get_args(hint)[0]) for item in value]
        return _MISMATCH if any(i is _MISMATCH for i in items) else tuple(items)
    accepts = _SCALARS.get(hint)
    if accepts is None:
        return value
    if not accepts(value):
        return _MISMATCH
    return float(value) if hint is float else value


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple:
        plural = {bool: "true/false values", int: "whole numbers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(typing.get_args(hint)[0], 'values')}"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
