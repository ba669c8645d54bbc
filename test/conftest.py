"""Shared fixtures: the committed real frames and the committed default model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMES_DIR = ROOT / "data" / "vtest"
MODEL_DIR = ROOT / "models" / "nanodet_g"


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
