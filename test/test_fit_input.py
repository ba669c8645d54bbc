"""The input trimmed to the camera's frames: the same grid and scale as the original's, so
the same detections for fewer MACs, and the MACs budget counts what it saved."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch", reason="the build needs the build extra")

from compressed_perception.compress.fit_input import FitInputSettings, fitted_size
from compressed_perception.compress.prune import _share_of_parent
from compressed_perception.compress.recipe import parse_recipe
from compressed_perception.compress.stage import ModelRef
from compressed_perception.errors import ConfigError
from compressed_perception.models.nanodet import with_input_size
from compressed_perception.runtime.manifest import load_manifest
from compressed_perception.runtime.preprocess import Letterbox

from conftest import MODEL_DIR, fitted_detector_on, held_out_agreement, original_model

SQUARE = (416, 416)


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ([(768, 576)], (352, 416)),  # 4:3: 416x312 of content
        ([(1280, 720)], (288, 416)),  # 16:9: 416x234
        ([(576, 768)], (416, 352)),  # portrait 3:4: the width is trimmed
        ([(640, 640)], SQUARE),  # fills the input: nothing to trim
        ([(768, 576), (1280, 720)], (352, 416)),  # the narrowest frame decides
        ([(768, 576), (640, 640)], SQUARE),
    ],
)
def test_the_input_keeps_what_the_frames_fill(frames, expected):
    assert fitted_size(SQUARE, 32, frames) == expected


def test_fitting_twice_changes_nothing():
    """Do no harm: a fitted input is already the smallest, and fits again to itself."""
    for frame in ((768, 576), (1280, 720), (576, 768), (640, 640), (1920, 1200)):
        once = fitted_size(SQUARE, 32, [frame])
        assert fitted_size(once, 32, [frame]) == once, frame


@pytest.mark.parametrize("frame", [(768, 576), (1280, 720), (1920, 1080), (576, 768), (300, 200)])
def test_the_fitted_input_holds_the_originals_content_on_its_grid(frame):
    """The runtime's own letterbox: the fitted buffer is the original's with whole strides
    of padding cut, pixel for pixel, so every cell sees what the original's cell sees."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (frame[1], frame[0], 3), dtype=np.uint8)
    height, width = fitted_size(SQUARE, 32, [frame])
    original, fitted = Letterbox(*SQUARE), Letterbox(width, height)
    before, after = original(image), fitted(image)
    assert (before.scale_x, before.scale_y) == (after.scale_x, after.scale_y)
    cut_x, cut_y = int(before.pad_x - after.pad_x), int(before.pad_y - after.pad_y)
    assert cut_x % 32 == 0 and cut_y % 32 == 0
    np.testing.assert_array_equal(
        original.buffer[0, cut_y : cut_y + height, cut_x : cut_x + width], fitted.buffer[0]
    )


def test_the_fitted_original_sees_what_the_original_sees(tmp_path):
    """Trimmed by whole strides, the original keeps its detections on held-out frames
    (0.996 / 0.998 on these 20); a trim of half a stride, which moves the coarsest grid,
    does not (0.940 / 0.946 here; 0.80 / 0.82 on all 395 of vtest's, against 0.993 / 0.995)."""
    fitted = with_input_size(original_model(), (352, 416))
    assert held_out_agreement(fitted, tmp_path / "fitted") >= (0.98, 0.98)
    off_grid = with_input_size(original_model(), (384, 416))
    assert held_out_agreement(off_grid, tmp_path / "off")[0] < 0.97


def test_frame_sizes_are_checked():
    with pytest.raises(ConfigError, match=r"fit_input sizes: \[0, 5\]"):
        FitInputSettings(sizes=((0, 5),))
    with pytest.raises(ConfigError, match="fit_input sizes"):
        parse_recipe({"fit_input": {"sizes": [[640]]}}, "recipe.yaml")
    with pytest.raises(ConfigError, match="fit_input: sizes must be a list"):
        parse_recipe({"fit_input": {"sizes": 640}}, "recipe.yaml")
    with pytest.raises(ConfigError, match="no frame sizes"):
        fitted_size(SQUARE, 32, [])


def test_the_macs_budget_counts_the_fitted_input():
    """prune's budget is a share of the original's MACs: after a fitted input (0.846 of
    them) it prunes that model to 0.6 / 0.846 of its own, and a budget the fitted input
    already meets is an error naming the key."""
    manifest = load_manifest(MODEL_DIR)
    original = 1_000_000
    parent = ModelRef(manifest, "k", 10, 846_000)
    assert _share_of_parent(0.6, parent, original) == pytest.approx(0.6 / 0.846)
    unfitted = dataclasses.replace(parent, macs=original)
    assert _share_of_parent(0.6, unfitted, original) == 0.6  # exactly the recipe's
    with pytest.raises(ConfigError, match=r"prune macs: 0\.9 of the original's MACs"):
        _share_of_parent(0.9, parent, original)


@pytest.fixture(scope="module")
def fitted_detector(tmp_path_factory, frames):
    return fitted_detector_on(tmp_path_factory.mktemp("fitted"), frames)


def test_frames_the_input_was_not_fitted_to_are_named(fitted_detector, frames):
    """Frames at least as wide as 416:352 fit (a 16:9 camera's too); a square camera's
    would be seen at a smaller scale than the original's: said, not silent."""
    assert fitted_detector.detect(frames[0]).unfitted is None
    assert fitted_detector.unfitted(1280, 720) is None
    square = np.ascontiguousarray(frames[0][:, :576])
    why = fitted_detector.detect(square).unfitted
    assert why is not None and "576x576 frames do not fit the 416x352 input" in why


@pytest.mark.parametrize("entry", [{"input_size": [416], "stride": 32}, {"stride": 32}, "416"])
def test_a_malformed_fit_record_is_refused_when_the_model_loads(fitted_detector, entry):
    from compressed_perception.errors import ModelError
    from compressed_perception.runtime.detector import Detector
    from compressed_perception.runtime.manifest import FITTED_FROM

    manifest = fitted_detector.manifest
    broken = dataclasses.replace(manifest, architecture={FITTED_FROM: entry})
    with pytest.raises(ModelError, match=f"{FITTED_FROM} must be"):
        Detector(broken, fitted_detector.backend)
