"""Prune, reconstruct and distill on a CUDA GPU (recipe `device: cuda`) keep the promises
they keep on the CPU. Skipped where torch sees no CUDA device; CP_REQUIRE_GPU=1 makes that
a failure on the GPU machine."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch", reason="the build stages need the build extra (torch)")
pytest.importorskip("torch_pruning", reason="pruning needs the build extra")
from compressed_perception.compress.distill import distill, resolve_precision  # noqa: E402
from compressed_perception.compress.prune import PruneSettings, prune  # noqa: E402
from compressed_perception.compress.recipe import load_recipe  # noqa: E402
from compressed_perception.compress.reconstruct import (  # noqa: E402
    ReconstructSettings,
    reconstruct,
)

from conftest import (  # noqa: E402
    ROOT,
    held_out_agreement,
    letterboxed,
    original_model,
    output_gap,
    skip_without_gpu,
)


@pytest.fixture(autouse=True)
def _cuda() -> None:
    if not torch.cuda.is_available():
        skip_without_gpu(f"torch {torch.__version__} sees no CUDA device")


def _on_cpu(model) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def test_a_copy_of_the_teacher_stays_the_teacher_on_cuda(frames, tmp_path):
    """The default recipe's distillation in the GPU's own precision (bf16 where it computes
    it) does no harm to a student that already is the teacher, and hands it back on the CPU."""
    defaults = load_recipe(ROOT / "config" / "build.yaml").stage("distill")
    settings = dataclasses.replace(
        defaults, steps=36, validate_every=12, validation_frames=16, freeze_shared=False
    )
    student = original_model()
    report = distill(student, original_model(), frames, settings, device="cuda")
    assert report.precision == resolve_precision("auto", "cuda")
    assert [v["step"] for v in report.validation] == [0, 12, 24, 36]
    assert all(v["map"] >= 0.99 and v["map50"] >= 0.99 for v in report.validation), (
        report.validation
    )
    assert _on_cpu(student)
    held_map, held_map50 = held_out_agreement(student, tmp_path)
    assert held_map >= 0.99 and held_map50 >= 0.99, (held_map, held_map50)


def test_prune_and_reconstruct_on_cuda_come_as_close_as_on_the_cpu(frames):
    """The GPU's convolutions round differently (TF32), so near-tied channels may be chosen
    differently; the model that comes back must still be as close to the original."""
    calibration = letterboxed(frames[1::10])
    others = letterboxed(frames[5::10])  # refitted on `calibration`, measured on these
    settings = PruneSettings(macs=0.7, calibration_frames=4, scan_ratios=(0.5,))
    gaps, kept = {}, {}
    for device in ("cpu", "cuda"):
        teacher, student = original_model(), original_model()
        kept[device] = prune(student, settings, calibration, device=device).kept
        before = output_gap(student, teacher, others)
        reconstruct(
            student,
            teacher,
            kept[device],
            calibration,
            ReconstructSettings(calibration_frames=4),
            device=device,
        )
        assert _on_cpu(student) and _on_cpu(teacher)
        gaps[device] = (before, output_gap(student, teacher, others))
    same = sum(kept["cpu"][n] == kept["cuda"][n] for n in kept["cpu"]) / len(kept["cpu"])
    assert kept["cpu"].keys() == kept["cuda"].keys()
    assert gaps["cuda"][1] < 0.5 * gaps["cuda"][0], gaps
    assert gaps["cuda"][1] <= 1.1 * gaps["cpu"][1], (gaps, same)
