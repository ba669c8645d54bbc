"""The manifest beside every model file: what it is, how to feed it, how it was made."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressed_perception.atomic import write_json
from compressed_perception.errors import ConfigError, IntegrityError, ModelError

FORMAT = "compressed_perception/manifest@1"
ARTIFACT_KINDS = ("onnx", "torch", "tensorrt", "openvino")
# architecture entry of a model whose input was trimmed to its cameras' frames (the
# build's fit_input): {"input_size": [h, w] before, "stride": the largest}
FITTED_FROM = "input_fitted_from"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """The model I/O contract: uint8 NHWC BGR `images` in, `boxes` and `scores` out."""

    input_name: str = "images"
    height: int = 416
    width: int = 416
    batch: int | None = 1  # None: dynamic batch dimension
    boxes_name: str = "boxes"
    scores_name: str = "scores"


@dataclass(frozen=True)
class Manifest:
    name: str
    classes: tuple[str, ...]
    precision: str
    artifacts: dict[str, str]  # kind -> file name, relative to the manifest's folder
    checksums: dict[str, str]  # file name -> sha256, artifacts and companions alike
    io: TensorSpec = field(default_factory=TensorSpec)
    architecture: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    folder: Path = Path()
    # kind -> further files the artifact needs beside it (an OpenVINO IR's weights)
    companions: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder / "manifest.json"

    def artifact(self, kind: str) -> Path:
        """The verified path of one model file (its companions verified too); raises if
        any is absent, truncated or tampered."""
        if kind not in self.artifacts:
            have = ", ".join(sorted(self.artifacts)) or "none"
            raise ModelError(f"{self.path}: no {kind} artifact in this manifest (has: {have})")
        for name in (*self.companions.get(kind, ()), self.artifacts[kind]):
            self._verify(kind, name)
        return self.folder / self.artifacts[kind]

    def verify(self) -> None:
        """Every file the manifest lists is present and has its recorded checksum."""
        for kind in self.artifacts:
            self.artifact(kind)

    def _verify(self, kind: str, name: str) -> None:
        path = self.folder / name
        if not path.is_file():
            raise ModelError(f"{path}: {kind} model file listed in {self.path} is missing")
        actual = sha256_file(path)
        if actual != self.checksums.get(name):
            raise IntegrityError(
                f"{path}: sha256 {actual[:16]}... does not match {self.path} "
                f"({str(self.checksums.get(name))[:16]}...): truncated, tampered or stale file"
            )

    def class_ids(self, names: Sequence[str]) -> tuple[int, ...] | None:
        """Class names or numeric ids to indices; None when `names` is empty (keep all)."""
        ids = []
        for name in names:
            if name in self.classes:
                ids.append(self.classes.index(name))
            elif name.isdigit() and int(name) < len(self.classes):
                ids.append(int(name))
            else:
                raise ConfigError(
                    f"classes: {name!r} is neither a class name nor an id of {self.name}"
                )
        return tuple(ids) or None

    def to_dict(self) -> dict[str, Any]:
        io = self.io
        return {
            "format": FORMAT,
            "name": self.name,
            "precision": self.precision,
            "input": {
                "name": io.input_name,
                "shape": [io.batch, io.height, io.width, 3],
                "dtype": "uint8",
                "layout": "NHWC",
                "color": "BGR",
            },
            "outputs": {"boxes": io.boxes_name, "scores": io.scores_name},
            "classes": list(self.classes),
            "artifacts": {kind: self._artifact_entry(kind) for kind in self.artifacts},
            "architecture": self.architecture,
            "source": self.source,
            "build": self.build,
        }

    def _artifact_entry(self, kind: str) -> dict[str, Any]:
        name = self.artifacts[kind]
        entry: dict[str, Any] = {"file": name, "sha256": self.checksums[name]}
        if self.companions.get(kind):
            entry["companions"] = [
                {"file": other, "sha256": self.checksums[other]} for other in self.companions[kind]
            ]
        return entry

    def save(self) -> Path:
        write_json(self.path, self.to_dict())
        return self.path


def create_manifest(
    folder: Path,
    artifacts: dict[str, str],
    companions: dict[str, list[str]] | None = None,
    **fields: Any,
) -> Manifest:
    """A manifest for files already written to `folder`, their checksums taken now."""
    extra = {kind: tuple(names) for kind, names in (companions or {}).items()}
    names = [*artifacts.values(), *(n for group in extra.values() for n in group)]
    checksums = {name: sha256_file(folder / name) for name in names}
    return Manifest(
        folder=folder, artifacts=artifacts, checksums=checksums, companions=extra, **fields
    )


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest file (or the manifest.json inside a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: model manifest not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable model manifest ({exc})") from exc
    try:
        return _parse(data, path.parent)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: malformed model manifest ({type(exc).__name__}: {exc})") from exc


def _parse(data: dict[str, Any], folder: Path) -> Manifest:
    if not isinstance(data, dict):
        raise TypeError(f"a manifest is a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ModelError(f"{folder / 'manifest.json'}: format {data.get('format')!r} != {FORMAT}")
    batch, height, width, channels = data["input"]["shape"]
    if channels != 3 or data["input"]["dtype"] != "uint8" or data["input"]["layout"] != "NHWC":
        raise ValueError("input must be uint8 NHWC with 3 channels")
    unknown = set(data["artifacts"]) - set(ARTIFACT_KINDS)
    if unknown:
        raise ValueError(f"unknown artifact kinds {sorted(unknown)}")
    classes = tuple(str(c) for c in data["classes"])
    if not classes:
        raise ValueError("no class names")
    entries = data["artifacts"]
    companions = {
        kind: tuple(str(c["file"]) for c in entry.get("companions", ()))
        for kind, entry in entries.items()
        if entry.get("companions")
    }
    files = [*entries.values(), *(c for e in entries.values() for c in e.get("companions", ()))]
    return Manifest(
        name=str(data["name"]),
        classes=classes,
        precision=str(data["precision"]),
        artifacts={kind: str(a["file"]) for kind, a in entries.items()},
        checksums={str(a["file"]): str(a["sha256"]) for a in files},
        companions=companions,
        io=TensorSpec(
            input_name=str(data["input"]["name"]),
            height=int(height),
            width=int(width),
            batch=None if batch is None else int(batch),
            boxes_name=str(data["outputs"]["boxes"]),
            scores_name=str(data["outputs"]["scores"]),
        ),
        architecture=dict(data.get("architecture", {})),
        source=dict(data.get("source", {})),
        build=dict(data.get("build", {})),
        folder=folder,
    )
