"""Stage outputs cached by a hash of everything that went into them.

A stage's key covers its settings, its parent stages' keys, the source model's checksums
and the package version, so a changed setting re-runs that stage and everything after it
and nothing else. The key leaves out the machine on purpose: a student pruned and
distilled on a GPU workstation is reused by the same recipe's build on the vehicle's CPU,
which then only quantizes; the stage's record names the device it ran on and the
arithmetic it trained in. A stage made for one machine (an engine) adds that machine to
its key. A stage folder appears only complete (built aside, then renamed), and its
`stage.json` is written last inside it: a folder without one is never served.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressed_perception import __version__
from compressed_perception.atomic import atomic_path, write_json

RECORD = "stage.json"


@dataclass(frozen=True)
class StageResult:
    name: str
    key: str
    folder: Path
    info: dict[str, Any]
    seconds: float
    cached: bool


def stage_key(name: str, inputs: dict[str, Any]) -> str:
    payload = json.dumps({"stage": name, "version": __version__, **inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class StageCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "stages"

    def run(
        self, name: str, inputs: dict[str, Any], produce: Callable[[Path], dict[str, Any]]
    ) -> StageResult:
        """`produce(folder)` writes the stage's files into `folder` and returns its info."""
        key = stage_key(name, inputs)
        folder = self.root / f"{name}-{key}"
        record = folder / RECORD
        if record.is_file():
            stored = json.loads(record.read_text())
            return StageResult(name, key, folder, stored["info"], stored["seconds"], True)
        started = time.perf_counter()
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            info = produce(tmp)
            seconds = round(time.perf_counter() - started, 2)
            write_json(
                tmp / RECORD,
                {"name": name, "key": key, "inputs": inputs, "info": info, "seconds": seconds},
            )
        return StageResult(name, key, folder, info, seconds, False)
