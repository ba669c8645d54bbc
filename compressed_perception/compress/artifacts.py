"""Writing what a stage made as a complete model folder: files, checksums and manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compressed_perception import __version__
from compressed_perception.compress.export import export_onnx
from compressed_perception.errors import ModelError
from compressed_perception.models.checkpoint import load_checkpoint, save_checkpoint
from compressed_perception.models.nanodet import NanoDet
from compressed_perception.runtime.manifest import Manifest, TensorSpec, create_manifest


def torch_model(manifest: Manifest, what: str) -> NanoDet:
    """The PyTorch checkpoint of `manifest`, with an error saying which stage needed it."""
    try:
        return load_checkpoint(manifest.artifact("torch"))
    except ModelError as exc:
        raise ModelError(f"{manifest.path}: {what} needs the PyTorch checkpoint ({exc})") from exc


def write_model(
    model: NanoDet,
    folder: Path,
    parent: Manifest,
    stage: str,
    *,
    dynamic_batch: bool,
    extra: dict[str, str] | None = None,
    architecture: dict[str, Any] | None = None,
) -> Manifest:
    """Checkpoint, verified ONNX and manifest of an FP32 model a stage made; `architecture`
    adds entries that later stages' models inherit."""
    model = model.cpu().eval()
    save_checkpoint(model, folder / "model.pt")
    spec = export_onnx(model, folder / "model.onnx", dynamic_batch=dynamic_batch)
    return write_manifest(
        folder,
        {"onnx": "model.onnx", "torch": "model.pt", **(extra or {})},
        parent,
        name=f"{parent.source.get('root', parent.name)}-{stage}",
        precision="fp32",
        stage=stage,
        io=spec,
        architecture={**parent.architecture, **model.config.to_dict(), **(architecture or {})},
    )


def write_manifest(
    folder: Path,
    artifacts: dict[str, str],
    parent: Manifest,
    *,
    name: str,
    precision: str,
    stage: str,
    io: TensorSpec | None = None,
    architecture: dict[str, Any] | None = None,
    build: dict[str, Any] | None = None,
    companions: dict[str, list[str]] | None = None,
) -> Manifest:
    """The manifest of files made from `parent`: its classes and I/O unless they changed."""
    manifest = create_manifest(
        folder,
        artifacts,
        companions=companions,
        name=name,
        classes=parent.classes,
        precision=precision,
        io=parent.io if io is None else io,
        architecture=parent.architecture if architecture is None else architecture,
        source=lineage(parent),
        build={**build_info(stage), **(build or {})},
    )
    manifest.save()
    return manifest


def lineage(parent: Manifest) -> dict[str, Any]:
    root = parent.source.get("root", parent.name)
    return {
        **parent.source,
        "root": root,
        "parent": parent.name,
        "parent_checksums": parent.checksums,
    }


def build_info(stage: str) -> dict[str, Any]:
    return {
        "stage": stage,
        "tool": f"compressed_perception {__version__}",
        "torch": torch.__version__,
    }


def counts(manifest: Manifest) -> tuple[int | None, int | None]:
    """Params and MACs from the PyTorch checkpoint, where the artifact has one."""
    if "torch" not in manifest.artifacts:
        return None, None
    import torch_pruning as tp

    model = load_checkpoint(manifest.artifact("torch"))
    example = torch.zeros(1, 3, *model.config.input_size)
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(params), int(macs)
