"""Structured pruning: smaller dense layers, the I/O contract intact, checkpoints that reload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressed_perception.compress.export import export_onnx
from compressed_perception.compress.prune import PruneSettings, prune
from compressed_perception.errors import ConfigError
from compressed_perception.models.checkpoint import load_checkpoint, save_checkpoint
from compressed_perception.models.nanodet import DeployModel
from compressed_perception.runtime.preprocess import Letterbox

from conftest import MODEL_DIR


def _model():
    return load_checkpoint(MODEL_DIR / "nanodet_g.pt")


def _convs(model):
    return {
        name: (m.in_channels, m.out_channels)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }


@pytest.fixture(scope="module")
def pruned_half():
    model = _model()
    report = prune(model, PruneSettings(ratio=0.5))
    return model, report


def test_half_the_channels_is_about_a_quarter_of_the_work(pruned_half):
    model, report = pruned_half
    summary = report.to_dict()
    assert summary["macs_before"] > 2.0e9  # NanoDet-g at 416x416
    assert 0.2 < summary["macs_ratio"] < 0.35
    assert 0.2 < summary["params_ratio"] < 0.35
    assert sum(p.numel() for p in model.parameters()) == report.params_after


def test_head_outputs_and_contract_are_kept(pruned_half):
    model, _ = pruned_half
    for pred in model.head.preds:
        assert pred.out_channels == 80 + 4 * 11
    pruned = _convs(model)
    assert pruned["backbone.stem.conv"][0] == 3  # the image keeps its 3 channels
    assert all(out % 8 == 0 for name, (_, out) in pruned.items() if "preds" not in name)
    with torch.no_grad():
        boxes, scores = DeployModel(model)(torch.zeros(1, 416, 416, 3, dtype=torch.uint8))
    assert boxes.shape == (1, 3549, 4)
    assert scores.shape == (1, 3549, 80)


def test_pruned_checkpoint_reloads_and_exports(tmp_path, pruned_half):
    model, _ = pruned_half
    save_checkpoint(model, tmp_path / "pruned.pt")
    loaded = load_checkpoint(tmp_path / "pruned.pt")
    assert _convs(loaded) == _convs(model)
    images = torch.randint(0, 256, (1, 416, 416, 3), dtype=torch.uint8)
    with torch.no_grad():
        for got, want in zip(DeployModel(loaded)(images), DeployModel(model)(images), strict=True):
            torch.testing.assert_close(got, want)
    spec = export_onnx(loaded, tmp_path / "pruned.onnx")  # verified against PyTorch inside
    assert (spec.height, spec.width, spec.batch) == (416, 416, 1)


def test_taylor_importance_uses_real_frames(frames):
    letterbox = Letterbox(416, 416)
    images = []
    for image in frames[:2]:
        letterbox(image)
        images.append(letterbox.buffer[0].copy())
    taylor, magnitude = _model(), _model()
    report = prune(taylor, PruneSettings(ratio=0.3, importance="taylor"), images)
    prune(magnitude, PruneSettings(ratio=0.3))
    assert report.macs_after < report.macs_before
    assert all(p.grad is None for p in taylor.parameters())  # no gradients left behind
    kept_taylor = taylor.backbone.stem.conv.weight
    kept_magnitude = magnitude.backbone.stem.conv.weight
    assert kept_taylor.shape == kept_magnitude.shape
    assert not torch.equal(kept_taylor, kept_magnitude)  # a different ranking of channels


def test_protected_module_keeps_its_channels():
    model = _model()
    prune(model, PruneSettings(ratio=0.5, protect=("neck.lateral.0",)))
    assert model.neck.lateral[0].out_channels == 128


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ratio": 0.0}, r"prune ratio: 0.0 is outside \(0, 0.9\]"),
        ({"ratio": 0.95}, "prune ratio: 0.95 is outside"),
        ({"importance": "random"}, "prune importance: 'random' is not one of"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        PruneSettings(**settings)


def test_bad_protect_and_missing_frames():
    with pytest.raises(ConfigError, match=r"no module \['neck.nowhere'\]"):
        prune(_model(), PruneSettings(protect=("neck.nowhere",)))
    with pytest.raises(ConfigError, match="'taylor' needs calibration images"):
        prune(_model(), PruneSettings(importance="taylor"))
