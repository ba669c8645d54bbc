"""Layer-wise least-squares reconstruction: closer to the original after pruning, and no
change at all to a model that is already the original."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="reconstruction needs the build extra (torch)")
pytest.importorskip("torch_pruning", reason="reconstruction needs the build extra")
from torch import nn  # noqa: E402

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

from conftest import letterboxed, original_model, output_gap  # noqa: E402

SETTINGS = ReconstructSettings(calibration_frames=4)


@pytest.fixture(scope="module")
def calibration(frames):
    return letterboxed(frames[1::10])


def test_an_unpruned_model_is_left_as_it_is(calibration, frames):
    """Do no harm: refitting the original to itself changes nothing."""
    teacher, student = original_model(), original_model()
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
    teacher, student = original_model(), original_model()
    settings = PruneSettings(
        macs=0.7, allocation="uniform", calibration_frames=4, scan_ratios=(0.5,)
    )
    kept = prune(student, settings, calibration).kept
    others = letterboxed(frames[5::10])  # refitted on `calibration`, measured on these
    before = output_gap(student, teacher, others)
    report = reconstruct(student, teacher, kept, calibration, SETTINGS)
    after = output_gap(student, teacher, others)
    assert after < 0.5 * before, (before, after)
    assert all(layer["after"] <= layer["before"] for layer in report.layers.values())
    assert report.layers["head.preds.0"]["after"] < report.layers["head.preds.0"]["before"]


def test_a_record_that_does_not_fit_is_refused(calibration):
    teacher, student = original_model(), original_model()
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


def _output_problem(seed=0, rows=3000, features=24, classes=6, bins=8):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=generator)
    outputs = classes + 4 * bins
    weight = torch.randn(outputs, features, generator=generator) * 0.5
    bias = torch.randn(outputs, generator=generator) - 2.0
    return x, weight, bias, classes, bins


def _objective_by_definition(x, wanted, weight, bias, classes, floor):
    """The output fit's objective written as its docstring defines it, for autograd."""
    logits = x @ weight.T + bias
    prob = wanted[:, :classes].sigmoid()
    kl_cls = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, :classes], prob, reduction="none"
    ).sum(1) - torch.nn.functional.binary_cross_entropy_with_logits(
        wanted[:, :classes], prob, reduction="none"
    ).sum(1)
    target = wanted[:, classes:].unflatten(-1, (4, -1)).log_softmax(-1)
    found = logits[:, classes:].unflatten(-1, (4, -1)).log_softmax(-1)
    kl_box = (target.exp() * (target - found)).sum(-1).mean(-1)
    objectness = prob.amax(1)
    cell = objectness + floor
    return (kl_cls * cell).sum() / cell.sum() + (kl_box * objectness).sum() / objectness.sum()


def test_the_output_objective_and_its_gradient_match_their_definition():
    """The fit's value and gradient are written out by hand; autograd checks both. The
    objective passes over 512 rows at a time, so the 3000 rows take six passes, the last
    one short."""
    from compressed_perception.compress.reconstruct import _OutputObjective

    x, teacher_weight, teacher_bias, classes, _bins = _output_problem()
    wanted = x @ teacher_weight.T + teacher_bias
    objective = _OutputObjective(x, wanted, classes, floor=0.1, chunk=512)
    noise = torch.randn(teacher_weight.shape, generator=torch.Generator().manual_seed(1))
    start = teacher_weight + 0.3 * noise
    weight = start.clone().requires_grad_(True)
    bias = torch.zeros_like(teacher_bias, requires_grad=True)
    expected = _objective_by_definition(x, wanted, weight, bias, classes, floor=0.1)
    expected.backward()
    expected = float(expected.detach())
    value, grad_weight, grad_bias = objective.value_and_gradient(start, torch.zeros(len(bias)))
    assert expected > 0.1
    assert float(value) == pytest.approx(expected, rel=1e-5)
    assert objective.value(start, torch.zeros(len(bias))) == pytest.approx(float(value))
    torch.testing.assert_close(grad_weight, weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_bias, bias.grad, rtol=1e-4, atol=1e-6)
    # do no harm: at the teacher's own weights there is nothing to gain
    value, grad_weight, grad_bias = objective.value_and_gradient(teacher_weight, teacher_bias)
    assert abs(float(value)) < 1e-6
    assert float(grad_weight.abs().max()) < 1e-5
    assert float(grad_bias.abs().max()) < 1e-5


def _inputs_match_full_passes(model, batches):
    """Walks the convs as reconstruction does, changing each one's weights as a refit
    would, and compares every input the replaying source yields with a full pass."""
    from compressed_perception.compress.reconstruct import _input_of, _Inputs
    from compressed_perception.compress.upstream import calls as _calls

    calls = _calls(model, batches[0][:1])
    order = [name for name in calls if isinstance(model.get_submodule(name), nn.Conv2d)]
    inputs = _Inputs(model, calls)
    replayed = set()
    with torch.no_grad(), inputs.replaying(batches):
        for name in order:
            got = list(inputs.of(name))
            replayed.update(inputs.kept)
            for found, batch in zip(got, batches, strict=True):
                assert torch.equal(found, _input_of(model, name, batch)), name
            conv = model.get_submodule(name)
            conv.weight.mul_(0.9).add_(0.01)
            conv.bias.add_(0.1)
            inputs.refitted(name)
        still_replaying = inputs.replay
    assert not any("forward" in vars(module) for module in model.modules())
    return still_replaying, replayed


def test_inputs_replayed_from_final_modules_are_those_of_full_passes(calibration):
    model = original_model().eval()
    batches = [batch[:1] for batch in normalized_batches(model, calibration[:2])] * 2
    still_replaying, replayed = _inputs_match_full_passes(model, batches)
    assert still_replaying
    assert {"backbone", "neck"} <= replayed  # what makes it cheaper did happen


class _ChangesOutputInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
        self.second = nn.Conv2d(4, 4, 1)
        self.third = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.first(x)
        y.add_(1.0)  # a kept output would drift by 1 on every replay
        return self.third(self.second(y))


def test_a_model_that_changes_outputs_in_place_is_not_replayed():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 8, 8, generator=generator) for _ in range(3)]
    still_replaying, replayed = _inputs_match_full_passes(_ChangesOutputInPlace(), batches)
    assert not still_replaying  # tried, found to differ from a full pass, and stopped
    assert not replayed
