"""Where the installed share files (models, sample data, config) are on this machine.

Looked up in order: $COMPRESSED_PERCEPTION_SHARE, the ament index (colcon install),
the virtual environment's share/ (pip install), and the source tree (development).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from compressed_perception.errors import ModelError

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


def default_model() -> Path:
    return find_shared("models/nanodet_g/manifest.json")


def sample_frames() -> Path:
    return find_shared("data/vtest")
