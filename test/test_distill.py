"""Distillation never hurts: a student that already is the teacher stays the teacher, and
the step kept is the latest within tolerance of the best on held-aside frames, never one
below the student as given."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch", reason="distillation needs the build extra (torch)")
from compressed_perception.compress import distill as distill_module  # noqa: E402
from compressed_perception.compress.distill import DistillSettings, distill  # noqa: E402
from compressed_perception.compress.recipe import load_recipe  # noqa: E402
from compressed_perception.datasets import FrameSource, load_frames  # noqa: E402
from compressed_perception.errors import ConfigError  # noqa: E402

from conftest import ROOT, held_out_agreement, original_model  # noqa: E402

SAMPLE_BAG = ROOT / "data" / "sample_bag"


def test_a_copy_of_the_teacher_stays_the_teacher(tmp_path):
    """The default recipe's distillation, a few dozen steps on real training frames, from a
    student that already is the teacher: every validation and the held-out frames agree.
    Every layer of a copy is shared with the teacher, and the recipe trains none of those;
    here they are trained, so that the recipe's training itself is what is tested."""
    defaults = load_recipe(ROOT / "config" / "build.yaml").stage("distill")
    assert defaults.freeze_shared
    changes = {"steps": 36, "validate_every": 12, "freeze_shared": False}
    settings = DistillSettings(**{**defaults.__dict__, **changes})
    frames = load_frames(FrameSource(str(SAMPLE_BAG)))
    student = original_model()
    report = distill(student, original_model(), frames, settings)
    assert len(report.losses) == 36
    assert [v["step"] for v in report.validation] == [0, 12, 24, 36]
    # the training itself never drifted, not only the step kept: before steps within the
    # noise floor were held, a bf16 copy fell to 0.984 / 0.988 at step 12 on a Zen 4 EPYC
    assert all(v["map"] >= 0.99 and v["map50"] >= 0.99 for v in report.validation), (
        report.validation
    )
    held_map, held_map50 = held_out_agreement(student, tmp_path)
    assert held_map >= 0.99 and held_map50 >= 0.99


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_copy_is_not_moved_at_all(precision):
    """Rounding is no signal: a copy's loss stays within the arithmetic's noise floor, so no
    step is taken and the weights stay bit for bit the teacher's (bf16 copies drifted)."""
    settings = DistillSettings(
        steps=6, validate_every=6, precision=precision, validation_frames=20, freeze_shared=False
    )
    teacher = original_model()
    student = original_model()
    report = distill(student, teacher, load_frames(FrameSource(str(SAMPLE_BAG))), settings)
    assert report.precision == precision
    assert report.frozen == []
    assert report.steps_held == 6, (report.losses, report.noise_floor)
    original = teacher.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in student.state_dict().items())


def test_a_real_difference_is_trained():
    """The floor holds rounding only: a student that differs from the teacher is trained."""
    settings = DistillSettings(steps=3, validate_every=3, warmup=0, validation_frames=20)
    student = original_model()
    with torch.no_grad():
        student.head.preds[0].bias += 0.5
    report = distill(student, original_model(), load_frames(FrameSource(str(SAMPLE_BAG))), settings)
    assert report.steps_held == 0
    assert min(report.losses) > 100 * report.noise_floor > 0


def test_moved_samples_are_trained_on_the_teacher_s_outputs_for_them():
    """A moved sample's targets are the teacher's on that very view: targets cached for the
    unmoved frame would teach the student to see everything a few pixels off."""
    import numpy as np

    teacher = original_model()
    frames = load_frames(FrameSource(str(SAMPLE_BAG), stop=12))
    samples = distill_module._Samples(frames, teacher, flip=False)
    cache = distill_module._TeacherCache(teacher, "cpu", "fp32")
    settings = DistillSettings(batch=4, move=7)
    batch, targets = distill_module._batch(
        samples, cache, settings, np.random.default_rng(1), "cpu"
    )
    _, still = samples.batch(4, np.random.default_rng(1))
    assert not torch.equal(batch, still)  # the same picks, moved
    assert (batch - still).abs().amax(dim=(1, 2, 3)).min() > 0  # every one of them
    expected = teacher.eval()(batch)
    for (cls, box), (want_cls, want_box) in zip(targets, expected, strict=True):
        torch.testing.assert_close(cls, want_cls)
        torch.testing.assert_close(box, want_box)
    assert not cache.store  # nothing cached under the frame's index


def _convolutions(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


def test_layers_shared_with_the_teacher_are_not_trained(monkeypatch):
    """The layers before the first one that differs compute what the teacher's do: they are
    left as they are, the rest is trained, and every parameter is trainable again after.
    The weights are checked as trained, not as kept (the kept step may be step 0)."""
    monkeypatch.setattr(distill_module._Kept, "restore", lambda _self, _model: None)
    settings = DistillSettings(steps=3, validate_every=3, warmup=0, validation_frames=20)
    teacher = original_model()
    student = original_model()
    with torch.no_grad():
        student.backbone.stages[1].in_conv.conv.weight.mul_(0.9)
    given = distill_module._copied(student)
    report = distill(student, teacher, load_frames(FrameSource(str(SAMPLE_BAG))), settings)
    shared = ["backbone.stem.conv", *(n for n in _convolutions(student) if ".stages.0." in n)]
    assert report.frozen == shared
    assert report.steps_held == 0
    trained = {k for k, v in student.state_dict().items() if not torch.equal(v, given[k])}
    assert trained, "nothing was trained"
    assert not any(name.startswith(tuple(shared)) for name in trained)
    assert "backbone.stages.1.in_conv.conv.weight" in trained
    assert all(p.requires_grad for p in student.parameters())


def test_a_copy_is_shared_whole_and_not_trained():
    """A copy shares every layer: nothing is left to train, and no step is taken."""
    settings = DistillSettings(steps=2, validate_every=2, validation_frames=20)
    student = original_model()
    report = distill(student, original_model(), load_frames(FrameSource(str(SAMPLE_BAG))), settings)
    assert report.frozen == _convolutions(student)
    assert report.steps_held == 2
    original = original_model().state_dict()
    assert all(torch.equal(v, original[k]) for k, v in student.state_dict().items())


def test_layers_with_running_statistics_are_never_frozen():
    """A user's model may keep batch norm: its statistics move in training mode, so it
    is trained as before even when it starts equal; layers past a changed one are not
    shared, whatever their weights."""

    def net() -> torch.nn.Sequential:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3),
            torch.nn.BatchNorm2d(4),
            torch.nn.Conv2d(4, 4, 1),
            torch.nn.Conv2d(4, 2, 1),
        )

    teacher, student = net().eval(), net().eval()
    with torch.no_grad():
        student[2].weight.mul_(0.5)
    assert distill_module._shared(student, teacher, torch.rand(2, 3, 8, 8)) == ["0"]


def _nudged(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        model.head.preds[0].bias += 1.0
    return distill_module._copied(model)


def _score(step: int, merit: float) -> dict[str, float]:
    return {"step": step, "map": merit, "map50": merit}


def test_the_latest_step_within_tolerance_of_the_best_is_kept():
    model = original_model()
    kept = distill_module._Kept(model, _score(0, 0.60), tolerance=0.01)
    kept.offer(model, _score(100, 0.64))
    _nudged(model)
    kept.offer(model, _score(200, 0.635))  # 0.005 under the best: kept, being later
    latest = _nudged(model)
    kept.offer(model, _score(300, 0.631))
    _nudged(model)
    kept.offer(model, _score(400, 0.62))  # 0.02 under the best
    assert kept.stalled == 1
    kept.restore(model)
    assert kept.step == 300
    assert all(torch.equal(latest[k], v) for k, v in model.state_dict().items())
    assert [entry["step"] for entry in kept.history] == [0, 100, 200, 300, 400]


def test_no_step_below_the_student_as_given_is_kept():
    model = original_model()
    given = distill_module._copied(model)
    kept = distill_module._Kept(model, _score(0, 0.60), tolerance=0.01)
    _nudged(model)
    kept.offer(model, _score(100, 0.5999))  # within tolerance, but under step 0
    assert (kept.step, kept.stalled) == (0, 0)  # not kept, yet not a stall either
    _nudged(model)
    kept.offer(model, _score(200, 0.55))
    assert (kept.step, kept.stalled) == (0, 1)
    kept.restore(model)
    assert all(torch.equal(given[k], v) for k, v in model.state_dict().items())
    kept.offer(model, _score(300, 0.60))  # a tie with step 0 goes to the later step
    assert (kept.step, kept.stalled) == (300, 0)


def test_the_shipped_build_kept_the_step_its_validation_history_gives():
    """The shipped report's distillation replayed through the rule: same step kept, and no
    stop before the steps it ran."""
    report = json.loads((ROOT / "models" / "nanodet_g_compressed" / "report.json").read_text())
    info, recipe = report["stages"]["distill"], report["recipe"]["distill"]
    first, *rest = info["validation"]
    model = original_model()
    kept = distill_module._Kept(model, first, tolerance=info["tolerance"])
    for result in rest:
        assert kept.stalled < recipe["patience"]
        kept.offer(model, result)
    assert rest[-1]["step"] == info["steps_run"]
    assert kept.step == info["kept_step"]


def test_too_few_frames_for_validation(frames):
    with pytest.raises(ConfigError, match=r"40 training frames, need more than validation_frames"):
        distill(original_model(), original_model(), frames, DistillSettings(steps=1))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch": 0}, "batch"),
        ({"lr": 0}, "lr"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"validation_frames": 1}, "validation_frames"),
        ({"precision": "fp8"}, "precision"),
        ({"tolerance": -0.01}, "tolerance"),
    ],
)
def test_bad_distill_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        DistillSettings(**settings)


def test_precision_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(distill_module, "_cpu_has_bf16", lambda: True)
    assert distill_module.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(distill_module, "_cpu_has_bf16", lambda: False)
    assert distill_module.resolve_precision("auto", "cpu") == "fp32"
    assert distill_module.resolve_precision("fp32", "cpu") == "fp32"


@pytest.mark.parametrize(
    ("isa", "capability", "lists", "expected"),
    [
        ("AVX2", "AVX512", True, False),  # oneDNN capped: bf16 would be emulated, 8.7x slower
        ("avx512_core_vnni", "AVX512", True, False),
        (None, "AVX2", True, False),  # ATen capped (ATEN_CPU_CAPABILITY=avx2)
        ("AVX512_CORE_BF16", "AVX512", True, True),
        (None, "AVX512", True, True),
        (None, "AVX512", False, False),  # no bf16 units
    ],
)
def test_bf16_needs_the_units_and_no_isa_cap(monkeypatch, isa, capability, lists, expected):
    if isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(distill_module, "_cpu_lists_bf16", lambda: lists)
    assert distill_module._cpu_has_bf16() is expected
