"""Structured pruning: a MACs budget met, channels chosen by their measured effect, the
removed channels' means folded into the next layers, and checkpoints that reload."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="pruning needs the build extra (torch)")
pytest.importorskip("torch_pruning", reason="pruning needs the build extra (torch-pruning)")
from torch import nn  # noqa: E402

from compressed_perception.compress import prune as prune_module  # noqa: E402
from compressed_perception.compress.export import export_onnx  # noqa: E402
from compressed_perception.compress.prune import PruneSettings, prune  # noqa: E402
from compressed_perception.errors import ConfigError  # noqa: E402
from compressed_perception.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from compressed_perception.models.nanodet import DeployModel  # noqa: E402

from conftest import letterboxed, original_model, output_gap  # noqa: E402

FAST = {"calibration_frames": 4, "scan_ratios": (0.5,)}


def _convs(model):
    return {
        name: (m.in_channels, m.out_channels)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }


@pytest.fixture(scope="module")
def calibration(frames):
    return letterboxed(frames[::10])


@pytest.fixture(scope="module")
def pruned(calibration):
    model = original_model()
    return model, prune(model, PruneSettings(macs=0.6, **FAST), calibration)


def test_the_macs_budget_is_met(pruned):
    model, result = pruned
    summary = result.report.to_dict()
    assert summary["macs_before"] > 2.0e9  # NanoDet-g at 416x416
    assert 0.5 < summary["macs_ratio"] <= 0.6
    assert sum(p.numel() for p in model.parameters()) == result.report.params_after
    # the scan covers every group, and groups were pruned unequally (not one ratio)
    assert set(summary["sensitivity"]) == set(summary["channels"])
    kept_shares = {after / before for before, after in summary["channels"].values()}
    assert len(kept_shares) > 2


def test_head_outputs_and_contract_are_kept(pruned):
    model, _ = pruned
    for pred in model.head.preds:
        assert pred.out_channels == 80 + 4 * 11
    found = _convs(model)
    assert found["backbone.stem.conv"][0] == 3  # the image keeps its 3 channels
    assert all(out % 16 == 0 for name, (_, out) in found.items() if "preds" not in name)
    with torch.no_grad():
        boxes, scores = DeployModel(model)(torch.zeros(1, 416, 416, 3, dtype=torch.uint8))
    assert boxes.shape == (1, 3549, 4)
    assert scores.shape == (1, 3549, 80)


def test_kept_channels_are_the_originals(pruned):
    model, result = pruned
    original = original_model()
    assert set(result.kept) == set(_convs(model))
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            assert len(result.kept[name]) == conv.out_channels
    # the first conv reads the unpruned image: its kept filters are the original ones
    kept = result.kept["backbone.stem.conv"]
    torch.testing.assert_close(
        model.backbone.stem.conv.weight, original.backbone.stem.conv.weight[kept]
    )


def test_removal_equals_folding_and_masking(calibration):
    """The surgery is exact: removing channels gives what zeroing them with their mean
    folded into the next layers' biases gives, so the measured effect is the real one."""
    model = original_model()
    graph = prune_module.tp.DependencyGraph().build_dependency(
        model, example_inputs=torch.zeros(1, 3, 416, 416)
    )
    groups = prune_module.channel_groups(model, graph)
    batches = prune_module.normalized_batches(model, calibration)
    stats = prune_module._Statistics.measure(model, groups, batches)
    group = next(g for g in groups if g.root == "backbone.stages.1.in_conv.conv")
    channels = list(range(0, group.size, 3))
    masked = copy.deepcopy(model)
    prune_module._fold_and_mask(masked, group, channels, stats)
    kept = prune_module._apply(
        model, graph, groups, {g.root: [] for g in groups} | {group.root: channels}, stats
    )
    assert len(kept[group.root]) == group.size - len(channels)
    with torch.no_grad():
        for got, want in zip(model(batches[0]), masked(batches[0]), strict=True):
            torch.testing.assert_close(got[0], want[0], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(got[1], want[1], atol=2e-4, rtol=1e-4)


def test_measured_importance_beats_weight_norm(calibration):
    """At the same budget and allocation, ranking channels by their measured effect keeps
    the model closer to the original than ranking them by weight norm."""
    settings = {"macs": 0.7, "allocation": "uniform", **FAST}
    reference = original_model()
    measured, magnitude = original_model(), original_model()
    prune(measured, PruneSettings(importance="reconstruction", **settings), calibration)
    prune(magnitude, PruneSettings(importance="magnitude", **settings), calibration)
    assert _convs(measured) == _convs(magnitude)  # the same shapes, other channels
    assert output_gap(measured, reference, calibration) < 0.8 * output_gap(
        magnitude, reference, calibration
    )


def test_pruned_checkpoint_reloads_and_exports(tmp_path, pruned):
    model, _ = pruned
    save_checkpoint(model, tmp_path / "pruned.pt")
    loaded = load_checkpoint(tmp_path / "pruned.pt")
    assert _convs(loaded) == _convs(model)
    images = torch.randint(0, 256, (1, 416, 416, 3), dtype=torch.uint8)
    with torch.no_grad():
        for got, want in zip(DeployModel(loaded)(images), DeployModel(model)(images), strict=True):
            torch.testing.assert_close(got, want)
    spec = export_onnx(loaded, tmp_path / "pruned.onnx")  # verified against PyTorch inside
    assert (spec.height, spec.width, spec.batch) == (416, 416, 1)


def test_protected_convolution_keeps_its_channels(calibration):
    model = original_model()
    settings = PruneSettings(macs=0.8, protect=("neck.lateral.0",), allocation="uniform", **FAST)
    prune(model, settings, calibration)
    assert model.neck.lateral[0].out_channels == 128


def test_a_budget_no_allocation_meets_is_refused(calibration):
    with pytest.raises(ConfigError, match=r"prune macs: 0.05 is below what pruning can reach"):
        prune(
            original_model(),
            PruneSettings(macs=0.05, allocation="uniform", calibration_frames=4),
            calibration,
        )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"macs": 1.0}, r"prune macs: 1.0 is outside \[0.05, 1\)"),
        ({"macs": 0.0}, "prune macs: 0.0 is outside"),
        ({"importance": "random"}, "prune importance: 'random' is not one of"),
        ({"allocation": "global"}, "prune allocation: 'global' is not one of"),
        ({"scan_ratios": (0.9,)}, r"prune scan_ratios: \[0.9\] must be in"),
        ({"calibration_frames": 2}, "prune calibration_frames: 2 is too few"),
        ({"round_to": 12}, "prune round_to: 12 is not one of 1, 2, 4, 8, 16, 32"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        PruneSettings(**settings)


def test_bad_protect_and_missing_frames(calibration):
    with pytest.raises(ConfigError, match=r"no convolution \['neck.nowhere'\]"):
        prune(original_model(), PruneSettings(protect=("neck.nowhere",), **FAST), calibration)
    with pytest.raises(ConfigError, match="2 calibration frames, at least 4 needed"):
        prune(original_model(), PruneSettings(**FAST), calibration[:2])


def test_frames_are_normalised_as_the_deployed_model_does(calibration):
    model = original_model()
    batch = prune_module.normalized_batches(model, calibration[:1])[0]
    deploy = DeployModel(model)
    image = torch.from_numpy(np.ascontiguousarray(calibration[0]))[None]
    expected = (image.float().permute(0, 3, 1, 2) - deploy.mean) * deploy.inv_std
    torch.testing.assert_close(batch, expected)


class _LinearCosts:
    """MACs as a fixed price per channel kept in each group, on top of a fixed rest."""

    def __init__(self, prices: dict[str, float], sizes: dict[str, int]) -> None:
        self.prices, self.sizes = prices, sizes

    def macs(self, removed: dict[str, int]) -> float:
        kept = {g: size - removed.get(g, 0) for g, size in self.sizes.items()}
        return 100.0 + sum(self.prices[g] * kept[g] for g in kept)


def _groups(sizes):
    return [prune_module.Group(root, size, [root], {}) for root, size in sizes.items()]


def test_filling_spends_the_leftover_budget_where_the_scan_found_most_harm():
    sizes = {"steep": 64, "flat": 64, "dear": 64}
    # "dear" loses most per channel but costs 10x as many MACs per channel
    prices = {"steep": 1.0, "flat": 1.0, "dear": 10.0}
    sensitivity = {
        "steep": {"0.5": 0.4},
        "flat": {"0.5": 0.01},
        "dear": {"0.5": 0.8},
    }
    costs = _LinearCosts(prices, sizes)
    uniform = dict.fromkeys(sizes, 32)
    budget_macs = costs.macs(uniform) + 20.0  # room for 16 cheap channels, no 8 dear ones
    settings = PruneSettings(macs=budget_macs / costs.macs({}), round_to=8)
    filled = prune_module._fill(_groups(sizes), costs, sensitivity, uniform, settings)
    assert costs.macs(filled) <= budget_macs
    assert filled == {"steep": 16, "flat": 32, "dear": 32}


def test_filling_a_budget_the_uniform_share_spends_changes_nothing():
    sizes = {"a": 64, "b": 32}
    costs = _LinearCosts({"a": 1.0, "b": 1.0}, sizes)
    uniform = {"a": 32, "b": 16}
    sensitivity = {"a": {"0.5": 0.3}, "b": {"0.5": 0.2}}
    exact = PruneSettings(macs=costs.macs(uniform) / costs.macs({}), round_to=8)
    assert prune_module._fill(_groups(sizes), costs, sensitivity, uniform, exact) == uniform


@pytest.mark.parametrize("round_to", [8, 16])
def test_allocation_steps_keep_channel_counts_rounded(round_to):
    sizes = {"a": 96, "b": 64, "c": 48}
    costs = _LinearCosts({"a": 1.0, "b": 2.0, "c": 4.0}, sizes)
    sensitivity = {"a": {"0.5": 0.1}, "b": {"0.5": 0.2}, "c": {"0.5": 0.3}}
    settings = PruneSettings(macs=0.6, round_to=round_to, allocation="sensitivity")
    removed = prune_module._allocate(_groups(sizes), costs, sensitivity, settings)
    assert costs.macs(removed) <= 0.6 * costs.macs({})
    assert all((sizes[g] - count) % round_to == 0 for g, count in removed.items())
    assert any(removed.values())
