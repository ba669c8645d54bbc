"""The offline build: prune, distill, export, quantize and compile, measuring every stage.

Each stage's output folder is a complete model artifact (files plus manifest) under
`<out>/stages/`, cached by the hash of its inputs, so a rerun resumes and a changed
setting redoes only what depends on it. Every artifact is then measured in one process,
so the report's ratios compare like with like.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from compressed_perception import __version__
from compressed_perception.atomic import write_json
from compressed_perception.benchmark import machine
from compressed_perception.compress.cache import StageCache, StageResult
from compressed_perception.compress.distill import distill
from compressed_perception.compress.export import export_onnx
from compressed_perception.compress.measure import (
    Candidate,
    best_cpu_artifact,
    curve,
    load_labelled,
    measure,
    targets,
)
from compressed_perception.compress.prune import prune
from compressed_perception.compress.quantize import quantize_ort, quantize_qdq
from compressed_perception.compress.recipe import Recipe
from compressed_perception.compress.report import Report, plot_losses, write_report
from compressed_perception.compress.tensorrt import build_engine, tensorrt_available
from compressed_perception.datasets import load_frames
from compressed_perception.errors import ModelError
from compressed_perception.models.checkpoint import load_checkpoint, save_checkpoint
from compressed_perception.models.nanodet import NanoDet
from compressed_perception.resources import default_model
from compressed_perception.runtime.manifest import (
    Manifest,
    TensorSpec,
    create_manifest,
    load_manifest,
)
from compressed_perception.runtime.preprocess import Letterbox

Log = Callable[[str], None]
MANIFEST = "manifest.json"
MIN_EVAL_FRAMES = 5


@dataclasses.dataclass
class _Build:
    recipe: Recipe
    source: Manifest
    cache: StageCache
    log: Log
    progress: bool
    stages: dict[str, StageResult] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def train_frames(self) -> list[np.ndarray]:
        """Loaded on first need only: a fully cached rerun never reads the video."""
        stages = (self.recipe.quantize_qdq, self.recipe.quantize_ort)
        wanted = [s.calibration_frames for s in stages if s is not None]
        self.log(f"reading training frames ({self.recipe.train.source})")
        return load_frames(self.recipe.train, minimum=max(wanted, default=1))

    def calibration(self, count: int, manifest: Manifest) -> np.ndarray:
        """`count` training frames spread over the whole range, letterboxed as at runtime."""
        frames = self.train_frames
        picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
        letterbox = Letterbox(manifest.io.width, manifest.io.height)
        batch = np.empty((count, manifest.io.height, manifest.io.width, 3), np.uint8)
        for slot, index in enumerate(picks):
            letterbox(frames[index], name=f"training frame {index}")
            batch[slot] = letterbox.buffer[0]
        return batch

    def stage(
        self, name: str, inputs: dict[str, Any], produce: Callable[[Path], dict[str, Any]]
    ) -> StageResult:
        self.log(f"[{name}] ...")
        result = self.cache.run(name, inputs, produce)
        how = "cached" if result.cached else f"done in {result.seconds:.1f} s"
        self.log(f"[{name}] {how}: {result.folder}")
        self.stages[name] = result
        return result


def build(
    recipe: Recipe, out: Path, log: Log = print, progress: bool = True, quick: bool = False
) -> dict[str, Path]:
    """Run `recipe` into `out`; returns the report files and the best CPU artifact's manifest."""
    started = time.perf_counter()
    out = Path(out)
    source = load_manifest(Path(recipe.source) if recipe.source else default_model())
    state = _Build(recipe, source, StageCache(out), log, progress)
    eval_frames = load_frames(recipe.evaluate, minimum=MIN_EVAL_FRAMES)
    labelled = load_labelled(recipe.labels, source.classes) if recipe.labels else []
    original = _model(source, str(source.checksums))
    candidates = [original.candidate("fp32")]
    student = _compress(state, candidates, original)
    _quantize(state, candidates, student, original)
    log(f"[measure] {len(candidates)} artifacts on {len(eval_frames)} held-out frames")
    measurements = measure(
        candidates, source, eval_frames, recipe.bench, out, progress, labelled=labelled
    )
    # what a build from scratch takes: cached stages count with their recorded time
    seconds = time.perf_counter() - started
    seconds += sum(r.seconds for r in state.stages.values() if r.cached)
    report = Report(
        recipe=recipe.to_dict(),
        machine=machine(),
        bench={
            "size": [recipe.bench.width, recipe.bench.height],
            "iterations": recipe.bench.iterations,
            "frames": len(eval_frames),
        },
        measurements=tuple(measurements),
        targets=targets(measurements, seconds, quick),
        stages={name: _stage_info(result) for name, result in state.stages.items()},
        skipped=state.skipped,
        curves={"CPU INT8 by prune ratio": curve(measurements, recipe.prune.ratio)}
        if recipe.prune is not None
        else {},
    )
    files = write_report(report, out)
    best = best_cpu_artifact(measurements)
    if best is not None:
        files["best"] = out / "best.json"
        write_json(files["best"], {"manifest": best.path, "stage": best.stage})
    log(f"report: {files['md']}")
    return files


@dataclasses.dataclass(frozen=True)
class _Model:
    """A model the build starts from or made: manifest, stage key, and its size counted once."""

    manifest: Manifest
    key: str
    params: int | None
    macs: int | None

    def candidate(self, stage: str, manifest: Path | None = None) -> Candidate:
        """A row to measure: this model, or a file made from it (same params and MACs)."""
        return Candidate(stage, manifest or self.manifest.path, self.params, self.macs)


def _model(manifest: Manifest, key: str) -> _Model:
    return _Model(manifest, key, *_counts(manifest))


def _compress(state: _Build, candidates: list[Candidate], original: _Model) -> _Model:
    """Prune then distill; returns the FP32 student (the original when both are off)."""
    recipe, source = state.recipe, state.source
    current = original
    if recipe.prune is not None:
        settings = recipe.prune
        taylor = settings.importance == "taylor"
        inputs = {
            "source": source.checksums,
            "prune": dataclasses.asdict(settings),
            "export": _export(recipe),
        }
        if taylor:
            inputs["train"] = dataclasses.asdict(recipe.train)

        def produce_pruned(folder: Path) -> dict[str, Any]:
            model = _teacher(source)
            images = list(state.calibration(16, source)) if taylor else []
            report = prune(model, settings, images)
            _write_model(model, folder, source, "pruned", recipe)
            return report.to_dict()

        result = state.stage("prune", inputs, produce_pruned)
        current = _model(load_manifest(result.folder), result.key)
        candidates.append(current.candidate("pruned"))
    if recipe.distill is not None:
        settings_d = recipe.distill
        inputs = {
            "parent": current.key if current is not original else source.checksums,
            "distill": dataclasses.asdict(settings_d),
            "train": dataclasses.asdict(recipe.train),
            "export": _export(recipe),
        }
        parent_manifest = current.manifest

        def produce_distilled(folder: Path) -> dict[str, Any]:
            student = load_checkpoint(parent_manifest.artifact("torch"))
            bar = tqdm(total=settings_d.steps, desc="distill", disable=not state.progress)
            report = distill(student, _teacher(source), state.train_frames, settings_d, _bar(bar))
            bar.close()
            losses = {"total": report.losses, **report.parts}
            write_json(folder / "losses.json", losses)
            plot_losses(losses, folder / "losses.png")
            _write_model(student, folder, source, "distilled", recipe)
            tail = report.losses[-20:] or [float("nan")]
            return {"steps": settings_d.steps, "final_loss": round(float(np.mean(tail)), 5)}

        result = state.stage("distill", inputs, produce_distilled)
        current = _model(load_manifest(result.folder), result.key)
        candidates.append(current.candidate("distilled"))
    return current


@dataclasses.dataclass(frozen=True)
class _Quantizer:
    """One INT8 path: the recipe section that configures it and what it writes."""

    section: str  # also the manifest's build stage
    run: Callable[[Path, Path, np.ndarray, Any], list[str]]
    precision: str
    kept: str  # report key for the nodes left unquantized


ORT_INT8 = _Quantizer("quantize_ort", quantize_ort, "int8", "kept_in_fp32")
QDQ_INT8 = _Quantizer("quantize_qdq", quantize_qdq, "int8-qdq", "kept_in_high_precision")


def _quantize(
    state: _Build, candidates: list[Candidate], student: _Model, original: _Model
) -> None:
    recipe = state.recipe
    if recipe.quantize_ort is not None:
        variants = [(student, "ort-int8")]
        if student is not original:  # the unpruned INT8 model: the other end of the trade-off
            variants.append((original, "ort-int8-unpruned"))
        for parent, label in variants:
            result = _quantized(state, ORT_INT8, recipe.quantize_ort, parent, label)
            candidates.append(parent.candidate(label, result.folder / MANIFEST))
    if recipe.quantize_qdq is None:
        state.skipped["tensorrt"] = "no Q/DQ model (quantize_qdq is off in the recipe)"
        return
    qdq = _quantized(state, QDQ_INT8, recipe.quantize_qdq, student, "quantize_qdq")
    candidates.append(student.candidate("qdq-int8", qdq.folder / MANIFEST))
    _engine(state, candidates, qdq, student)


def _quantized(
    state: _Build, quantizer: _Quantizer, settings: Any, parent: _Model, stage: str
) -> StageResult:
    """Calibrate on training frames and quantize `parent`'s ONNX as stage `stage`."""
    manifest = parent.manifest

    def produce(folder: Path) -> dict[str, Any]:
        calibration = state.calibration(settings.calibration_frames, manifest)
        kept = quantizer.run(
            manifest.artifact("onnx"), folder / "model.onnx", calibration, settings
        )
        _write_manifest(
            folder,
            {"onnx": "model.onnx"},
            manifest,
            name=f"{manifest.name}-{quantizer.precision}",
            precision=quantizer.precision,
            stage=quantizer.section,
        )
        return {quantizer.kept: kept}

    inputs = {
        "parent": parent.key,
        quantizer.section: dataclasses.asdict(settings),
        "train": dataclasses.asdict(state.recipe.train),
    }
    return state.stage(stage, inputs, produce)


def _engine(state: _Build, candidates: list[Candidate], qdq: StageResult, student: _Model) -> None:
    settings = state.recipe.tensorrt
    if settings is None:
        state.skipped["tensorrt"] = "off in the recipe"
        return
    reason = tensorrt_available()
    if reason is not None:
        state.skipped["tensorrt"] = reason
        state.log(f"[tensorrt] skipped: {reason}")
        return
    qdq_manifest = load_manifest(qdq.folder)
    timing_cache = state.cache.root.parent / "tensorrt.timing-cache"

    def produce_engine(folder: Path) -> dict[str, Any]:
        manifest = build_engine(
            qdq_manifest.artifact("onnx"),
            qdq_manifest,
            folder,
            settings,
            timing_cache if settings.timing_cache else None,
        )
        return dict(manifest.build)

    from compressed_perception.runtime.cuda import device_info

    inputs = {
        "parent": qdq.key,
        "tensorrt": dataclasses.asdict(settings),
        "device": list(device_info()),
    }
    result = state.stage("tensorrt", inputs, produce_engine)
    candidates.append(student.candidate("tensorrt", result.folder / MANIFEST))


def _teacher(source: Manifest) -> NanoDet:
    try:
        return load_checkpoint(source.artifact("torch"))
    except ModelError as exc:
        raise ModelError(
            f"{source.path}: pruning and distillation need the PyTorch checkpoint ({exc})"
        ) from exc


def _write_model(
    model: NanoDet, folder: Path, source: Manifest, stage: str, recipe: Recipe
) -> None:
    save_checkpoint(model, folder / "model.pt")
    spec = export_onnx(model, folder / "model.onnx", dynamic_batch=recipe.export.dynamic_batch)
    _write_manifest(
        folder,
        {"onnx": "model.onnx", "torch": "model.pt"},
        source,
        name=f"{source.name}-{stage}",
        precision="fp32",
        stage=stage,
        io=spec,
        architecture={**source.architecture, **model.config.to_dict()},
    )


def _write_manifest(
    folder: Path,
    artifacts: dict[str, str],
    parent: Manifest,
    *,
    name: str,
    precision: str,
    stage: str,
    io: TensorSpec | None = None,
    architecture: dict[str, Any] | None = None,
) -> None:
    """The manifest of files made from `parent`: its classes and I/O unless they changed."""
    manifest = create_manifest(
        folder,
        artifacts,
        name=name,
        classes=parent.classes,
        precision=precision,
        io=parent.io if io is None else io,
        architecture=parent.architecture if architecture is None else architecture,
        source=_lineage(parent),
        build=_build_info(stage),
    )
    manifest.save()


def _lineage(parent: Manifest) -> dict[str, Any]:
    return {"parent": parent.name, "parent_checksums": parent.checksums, **parent.source}


def _build_info(stage: str) -> dict[str, Any]:
    return {
        "stage": stage,
        "tool": f"compressed_perception {__version__}",
        "torch": torch.__version__,
    }


def _export(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe.export)


def _counts(manifest: Manifest) -> tuple[int | None, int | None]:
    """Params and MACs from the PyTorch checkpoint, where the artifact has one."""
    if "torch" not in manifest.artifacts:
        return None, None
    import torch_pruning as tp

    model = load_checkpoint(manifest.artifact("torch"))
    example = torch.zeros(1, 3, *model.config.input_size)
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(params), int(macs)


def _bar(bar: tqdm) -> Callable[[int, int, float], None]:
    def update(step: int, steps: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    return update


def _stage_info(result: StageResult) -> dict[str, Any]:
    return {"seconds": result.seconds, "cached": result.cached, "key": result.key, **result.info}
