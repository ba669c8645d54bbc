"""The offline build: every registered stage in order, then every artifact measured.

Each stage's output folder is a complete model artifact (files plus manifest) under
`<out>/stages/`, cached by the hash of its inputs, so a rerun resumes and a changed
setting redoes only what depends on it. Every artifact is then measured in one process,
so the report's ratios compare like with like. The orchestrator knows stages only through
their `Stage` description (`stage.py`); which stages exist is `stages.STAGES`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from compressed_perception.atomic import write_json
from compressed_perception.benchmark import machine
from compressed_perception.compress.artifacts import counts
from compressed_perception.compress.cache import StageCache, StageResult, stage_key
from compressed_perception.compress.measure import (
    Candidate,
    best_cpu_artifact,
    class_tables,
    curve,
    load_labelled,
    measure,
    targets,
)
from compressed_perception.compress.recipe import Recipe
from compressed_perception.compress.report import Report, write_report
from compressed_perception.compress.stage import (
    ORIGINAL,
    STUDENT,
    BuildContext,
    ModelRef,
    Stage,
    Variant,
    settings_dict,
)
from compressed_perception.compress.stages import STAGES
from compressed_perception.datasets import load_frames
from compressed_perception.errors import ConfigError
from compressed_perception.resources import fp32_model
from compressed_perception.runtime.manifest import Manifest, load_manifest

MIN_EVAL_FRAMES = 5
SOURCE_ROW = "fp32"


@dataclasses.dataclass(frozen=True)
class Step:
    """One stage run the recipe asks for: which stage, on which model, with what settings."""

    stage: Stage
    variant: Variant
    settings: Any


def schedule(recipe: Recipe) -> Iterator[Step]:
    """The stage runs of `recipe`, in order. A variant on the original model is dropped when
    no earlier stage changed the model: it would be the student variant again."""
    changes = any(
        s.makes_student and not s.replaces_original and recipe.stage(s.section) is not None
        for s in STAGES
    )
    for stage in STAGES:
        settings = recipe.stage(stage.section)
        if settings is None:
            continue
        for variant in stage.variants:
            if variant.parent == ORIGINAL and not changes:
                continue
            yield Step(stage, variant, settings)


def stage_inputs(step: Step, parent_key: str, context: BuildContext) -> dict[str, Any]:
    """Everything the stage's output depends on, hashed into its cache key."""
    stage, recipe = step.stage, context.recipe
    inputs: dict[str, Any] = {"parent": parent_key, stage.section: settings_dict(step.settings)}
    if stage.uses_frames:
        inputs["train"] = dataclasses.asdict(recipe.train)
    if stage.makes_student:
        inputs["export"] = dataclasses.asdict(recipe.export)
    if stage.key_extra is not None:
        inputs.update(stage.key_extra(context, step.settings))
    if stage.revision != 1:
        inputs["revision"] = stage.revision
    return inputs


def plan(recipe: Recipe, source: Manifest) -> list[tuple[str, str]]:
    """(cache name, key) of every stage run, without running anything: what a build would
    reuse or redo. Stages whose key depends on the machine (an engine) are left out."""
    context = BuildContext(recipe, source, log=lambda _: None, progress=False)
    keys = {ORIGINAL: _source_key(source)}
    keys[STUDENT] = keys[ORIGINAL]
    found = []
    for step in schedule(recipe):
        parent = keys.get(step.variant.parent)
        if parent is None or step.stage.key_extra is not None:
            continue
        key = stage_key(step.variant.cache, stage_inputs(step, parent, context))
        found.append((step.variant.cache, key))
        keys.setdefault(step.stage.section, key)
        if step.stage.makes_student:
            keys[STUDENT] = key
        if step.stage.replaces_original:
            keys[ORIGINAL] = key
    return found


def build(
    recipe: Recipe, out: Path, log: Any = print, progress: bool = True, quick: bool = False
) -> dict[str, Path]:
    """Run `recipe` into `out`; returns the report files and the best CPU artifact's manifest."""
    started = time.perf_counter()
    out = Path(out)
    source = load_manifest(Path(recipe.source) if recipe.source else fp32_model())
    cache = StageCache(out)
    context = BuildContext(
        recipe, source, log, progress, cache_root=cache.root, device=resolve_device(recipe)
    )
    eval_frames = load_frames(recipe.evaluate, minimum=MIN_EVAL_FRAMES)
    labelled = load_labelled(recipe.labels, source.classes) if recipe.labels else []
    original = ModelRef(source, _source_key(source), *context.source_counts)
    run = _Run(context, cache, original)
    for step in schedule(recipe):
        run.step(step)
    log(f"[measure] {len(run.candidates)} artifacts on {len(eval_frames)} held-out frames")
    measuring = time.perf_counter()
    measurements = measure(
        run.candidates, source, eval_frames, recipe.bench, out, progress, labelled=labelled
    )
    spent = {_spent_label(name, r): r.seconds for name, r in run.results.items()}
    spent[f"measuring {len(run.candidates)} artifacts"] = time.perf_counter() - measuring
    # what a build from scratch takes: cached stages count with their recorded time
    seconds = time.perf_counter() - started
    seconds += sum(r.seconds for r in run.results.values() if r.cached)
    report = Report(
        recipe=recipe.to_dict(),
        machine=machine(),
        bench={
            "size": [recipe.bench.width, recipe.bench.height],
            "iterations": recipe.bench.iterations,
            "frames": len(eval_frames),
        },
        measurements=tuple(measurements),
        targets=targets(measurements, seconds, quick, spent),
        stages={name: _stage_info(result) for name, result in run.results.items()},
        skipped=run.skipped,
        curves={"CPU INT8 by MACs": points} if (points := curve(measurements)) else {},
        tables={**run.tables, **class_tables(measurements)},
        checks=run.checks,
    )
    files = write_report(report, out)
    best = best_cpu_artifact(measurements)
    if best is not None:
        files["best"] = out / "best.json"
        write_json(files["best"], {"manifest": best.path, "stage": best.stage})
    log(f"report: {files['md']}")
    return files


def resolve_device(recipe: Recipe) -> str:
    """Where prune, reconstruct and distill run; `cuda` without a GPU is an error."""
    available = torch.cuda.is_available()
    if recipe.device == "cuda" and not available:
        raise ConfigError(
            f"recipe device: cuda, but torch {torch.__version__} sees no CUDA device here "
            "(use device: auto or cpu)"
        )
    if recipe.device == "auto":
        return "cuda" if available else "cpu"
    return recipe.device


class _Run:
    """The state of one build: models made so far, what was measured, skipped and checked."""

    def __init__(self, context: BuildContext, cache: StageCache, original: ModelRef) -> None:
        self.context = context
        self.cache = cache
        self.models: dict[str, ModelRef] = {ORIGINAL: original, STUDENT: original}
        self.candidates = [_candidate(SOURCE_ROW, original, "onnxruntime", cpu=True)]
        self.results: dict[str, StageResult] = {}
        self.skipped: dict[str, str] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.tables: dict[str, dict[str, Any]] = {}

    def step(self, step: Step) -> None:
        stage, variant = step.stage, step.variant
        parent = self.models.get(variant.parent)
        if parent is None:
            self.skipped[variant.cache] = f"no {variant.parent} output (off in the recipe)"
            return
        if stage.check is not None:
            self.checks[variant.cache] = stage.check(self.context, parent, step.settings)
        reason = stage.unavailable() if stage.unavailable is not None else None
        if reason is not None:
            self.skipped[variant.cache] = reason
            self.context.log(f"[{variant.cache}] skipped: {reason}")
            return
        result = self._run(step, parent)
        made = load_manifest(result.folder)
        sizes = counts(made) if stage.makes_student else (parent.params, parent.macs)
        ref = ModelRef(made, result.key, *sizes)
        self.models.setdefault(stage.section, ref)
        self.models.setdefault(variant.cache, ref)  # a later stage may take one variant
        if stage.makes_student:
            self.models[STUDENT] = ref
        if stage.replaces_original:
            self.models[ORIGINAL] = ref
        self.candidates.append(_candidate(variant.row, ref, stage.backend, cpu=stage.cpu))
        if stage.tables is not None:
            for name, table in stage.tables(result.info).items():
                self.tables[name] = dataclasses.asdict(table)

    def _run(self, step: Step, parent: ModelRef) -> StageResult:
        name = step.variant.cache
        inputs = stage_inputs(step, parent.key, self.context)
        self.context.log(f"[{name}] ...")

        def produce(folder: Path) -> dict[str, Any]:
            info = step.stage.produce(self.context, parent, step.settings, folder)
            if not step.stage.makes_student:
                return info
            # the key names the inputs, not the machine: the record says where torch ran it
            return {**info, "device": self.context.device}

        result = self.cache.run(name, inputs, produce)
        how = "cached" if result.cached else f"done in {result.seconds:.1f} s"
        self.context.log(f"[{name}] {how}: {result.folder}")
        self.results[name] = result
        return result


def _candidate(row: str, model: ModelRef, backend: str, cpu: bool) -> Candidate:
    return Candidate(row, model.manifest.path, model.params, model.macs, backend, cpu)


def _source_key(source: Manifest) -> str:
    return str(source.checksums)


def _spent_label(name: str, result: StageResult) -> str:
    """A stage's name, with the arithmetic it trained in where it trained."""
    precision = result.info.get("precision")
    return f"{name} ({precision})" if precision else name


def _stage_info(result: StageResult) -> dict[str, Any]:
    return {"seconds": result.seconds, "cached": result.cached, "key": result.key, **result.info}
