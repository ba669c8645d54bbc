"""Shared fixtures: the committed real frames and the committed default model; and how a
test that needs a GPU stack steps aside where there is none."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMES_DIR = ROOT / "data" / "vtest"
MODEL_DIR = ROOT / "models" / "nanodet_g"
# set to 1 on the GPU machine: a test that needs TensorRT or a GPU fails there instead of
# skipping, so a broken driver or install cannot pass as "not this machine"
REQUIRE_GPU = "CP_REQUIRE_GPU"


def skip_without_gpu(reason: str) -> None:
    """Skip, naming `reason`; or fail with it where REQUIRE_GPU says the GPU stack is here."""
    if os.environ.get(REQUIRE_GPU) == "1":
        pytest.fail(f"{REQUIRE_GPU}=1, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def frame_paths() -> list[Path]:
    paths = sorted(FRAMES_DIR.glob("vtest_*.jpg"))
    assert len(paths) == 40, "data/vtest must hold the 40 committed frames"
    return paths


@pytest.fixture(scope="session")
def frames(frame_paths: list[Path]) -> list[np.ndarray]:
    return [cv2.imread(str(p)) for p in frame_paths]


@pytest.fixture(scope="session")
def manifest_path() -> Path:
    return MODEL_DIR / "manifest.json"
