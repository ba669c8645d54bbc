"""Layer-wise least-squares reconstruction: closer to the original after pruning, and no
change at all to a model that is already the original."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="reconstruction needs the build extra (torch)")
pytest.importorskip("torch_pruning", reason="reconstruction needs the build extra")
from torch import nn  # noqa: E402

from compressed_perception.compress.objective import discrepancy  # noqa: E402
from compressed_perception.compress.prune import (  # noqa: E402
    PruneSettings,
    normalized_batches,
    prune,
)
from compressed_perception.compress.reconstruct import (  # noqa: E402
    ReconstructSettings,
    reconstruct,
)
from compressed_perception.errors import ConfigError, ModelError  # noqa: E402
from compressed_perception.models.checkpoint import load_checkpoint  # noqa: E402
from compressed_perception.runtime.preprocess import Letterbox  # noqa: E402

from conftest import MODEL_DIR  # noqa: E402

SETTINGS = ReconstructSettings(calibration_frames=4)


def _model():
    return load_checkpoint(MODEL_DIR / "nanodet_g.pt")


@pytest.fixture(scope="module")
def calibration(frames):
    letterbox = Letterbox(416, 416)
    images = []
    for image in frames[1::10]:
        letterbox(image)
        images.append(letterbox.buffer[0].copy())
    return images


def _gap(model, reference, images):
    total = 0.0
    with torch.no_grad():
        for batch in normalized_batches(reference, images):
            terms = discrepancy(reference(batch), model(batch))
            total += float(sum(terms.values()))
    return total


def test_an_unpruned_model_is_left_as_it_is(calibration, frames):
    """Do no harm: refitting the original to itself changes nothing."""
    teacher, student = _model(), _model()
    kept = {
        n: list(range(m.out_channels))
        for n, m in student.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    report = reconstruct(student, teacher, kept, calibration, SETTINGS)
    assert all(layer["after"] <= layer["before"] for layer in report.layers.values())
    assert max(layer["before"] for layer in report.layers.values()) < 1e-6
    batch = normalized_batches(teacher, calibration)[0]
    with torch.no_grad():
        for got, want in zip(student(batch), teacher(batch), strict=True):
            torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(got[1], want[1], atol=1e-3, rtol=1e-4)


def test_a_pruned_model_comes_much_closer(calibration, frames):
    teacher, student = _model(), _model()
    settings = PruneSettings(
        macs=0.7, allocation="uniform", calibration_frames=4, scan_ratios=(0.5,)
    )
    kept = prune(student, settings, calibration).kept
    others = []  # refitted on `calibration`, measured on other frames
    letterbox = Letterbox(416, 416)
    for image in frames[5::10]:
        letterbox(image)
        others.append(letterbox.buffer[0].copy())
    before = _gap(student, teacher, others)
    report = reconstruct(student, teacher, kept, calibration, SETTINGS)
    after = _gap(student, teacher, others)
    assert after < 0.5 * before, (before, after)
    assert all(layer["after"] <= layer["before"] for layer in report.layers.values())
    assert report.layers["head.preds.0"]["after"] < report.layers["head.preds.0"]["before"]


def test_a_record_that_does_not_fit_is_refused(calibration):
    teacher, student = _model(), _model()
    kept = {
        n: list(range(m.out_channels))
        for n, m in student.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    kept["neck.lateral.0"] = kept["neck.lateral.0"][:64]
    with pytest.raises(
        ModelError, match=r"neck\.lateral\.0 has 128 output channels, the record lists 64"
    ):
        reconstruct(student, teacher, kept, calibration, SETTINGS)
    del kept["neck.lateral.0"]
    with pytest.raises(ModelError, match=r"no record of which channels neck\.lateral\.0 kept"):
        reconstruct(student, teacher, kept, calibration, SETTINGS)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"calibration_frames": 2}, "too few"), ({"ridge": 0.0}, "ridge"), ({"ridge": 2.0}, "ridge")],
)
def test_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        ReconstructSettings(**settings)
