"""Where the installed share files (models, sample data, config) are on this machine.

Looked up in order: $COMPRESSED_PERCEPTION_SHARE, the ament index (colcon install),
the virtual environment's share/ (pip install), and the source tree (development).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from compressed_perception.errors import ModelError, PerceptionError

PACKAGE = "compressed_perception"


def share_dirs() -> list[Path]:
    candidates = []
    if os.environ.get("COMPRESSED_PERCEPTION_SHARE"):
        candidates.append(Path(os.environ["COMPRESSED_PERCEPTION_SHARE"]))
    with contextlib.suppress(ImportError, LookupError):
        # PackageNotFoundError is a KeyError: the package is not in a sourced workspace.
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE)))
    candidates.append(Path(sys.prefix) / "share" / PACKAGE)
    candidates.append(Path(__file__).resolve().parents[1])
    return candidates


def find_shared(relative: str) -> Path:
    """The first existing `relative` path under the share folders."""
    for folder in share_dirs():
        if (folder / relative).exists():
            return folder / relative
    searched = ", ".join(str(d) for d in share_dirs())
    raise ModelError(f"{relative}: not found in any share folder ({searched})")


FP32_MODEL = "models/nanodet_g/manifest.json"
DEFAULT_INDEX = "models/default.json"  # the shipped compressed model's artifacts, best first


def fp32_model() -> Path:
    """The original FP32 NanoDet-g: what the build compresses, and the reference."""
    return find_shared(FP32_MODEL)


def default_model(backend: str = "auto") -> Path:
    """The shipped compressed model's best artifact that `backend` (`auto`: any backend
    installed here) can run.

    `models/default.json` lists the artifacts of the shipped build in the order its report
    ranks them (the CPU INT8 model first); OpenVINO may be missing on a ROS machine, or the
    user asked for ONNX Runtime, so the next one is taken. Without a shipped build, or
    where none fits, the FP32 original.
    """
    from compressed_perception.runtime.manifest import load_manifest

    try:
        index = find_shared(DEFAULT_INDEX)
    except ModelError:
        return fp32_model()
    try:
        listed = json.loads(index.read_text())["artifacts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{index}: unreadable list of default artifacts ({exc})") from exc
    for relative in listed:
        path = index.parent / relative
        try:
            if _runs(load_manifest(path), backend):
                return path
        except PerceptionError:
            continue
    return fp32_model()


def _runs(manifest: Any, backend: str) -> bool:
    """Whether `backend` (`auto`: any) installed here can run one of the manifest's files."""
    from compressed_perception.runtime.backends import runnable

    kinds = runnable(manifest)
    return bool(kinds) if backend == "auto" else backend in kinds


def resolve_model(model: str | Path | None, backend: str = "auto") -> Path:
    """A model argument: empty for the default (the best one `backend` runs), a manifest or
    its folder, or the name of a shipped model folder (e.g. `nanodet_g`, the FP32 original)."""
    if model is None or str(model) == "":
        return default_model(backend)
    path = Path(model)
    if path.exists():
        return path
    shipped = [f"models/{model}/manifest.json", f"models/{model}"]
    for relative in shipped:
        try:
            return find_shared(relative)
        except ModelError:
            continue
    raise ModelError(f"{model}: no such model manifest, folder or shipped model name")


def sample_frames() -> Path:
    return find_shared("data/vtest")
