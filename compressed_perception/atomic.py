"""Write-then-rename, so that a crash or full disk never leaves a file that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a path to create `dest` at; on success it replaces `dest`, else it is removed.

    The yielded path has `dest`'s own name, inside a hidden staging folder beside it, so
    that tools which name inner files after their folder (rosbag2 does) name them right.
    Works for files and folders alike.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    tmp = staging / dest.name
    try:
        yield tmp
        if tmp.is_dir() or dest.is_dir():
            _remove(dest)  # os.replace cannot put a folder over a file or a non-empty folder
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_text(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: Path, payload: Any) -> None:
    write_text(dest, json.dumps(payload, indent=2) + "\n")
