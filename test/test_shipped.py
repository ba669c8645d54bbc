"""The shipped compressed model: what its manifests, checksums and report say agrees, and it
is what runs when no model is named."""

from __future__ import annotations

import json

import pytest

from compressed_perception.compress.measure import MIN_MAP, MIN_MAP50
from compressed_perception.compress.report import load_report
from compressed_perception.errors import IntegrityError
from compressed_perception.resources import default_model, resolve_model
from compressed_perception.runtime.manifest import load_manifest

from conftest import ROOT

MODELS = ROOT / "models"
SHIPPED = MODELS / "nanodet_g_compressed"


@pytest.fixture(scope="module")
def record():
    return json.loads((SHIPPED / "shipped.json").read_text())


@pytest.fixture(scope="module")
def report():
    return load_report(SHIPPED / "report.json")


def test_every_shipped_file_matches_its_manifest(record):
    assert set(record["artifacts"]) >= {"fp32", "ort_int8", "qdq_int8"}
    for folder in record["artifacts"]:
        load_manifest(SHIPPED / folder).verify()


def test_the_report_measured_exactly_these_files(record, report):
    rows = {(m.stage, m.backend): m for m in report.measurements}
    for folder, entry in record["artifacts"].items():
        measured = rows[(entry["row"], entry["backend"])]
        manifest = load_manifest(SHIPPED / folder)
        kind = next(k for k in ("openvino", "onnx") if k in manifest.artifacts)
        files = (manifest.artifacts[kind], *manifest.companions.get(kind, ()))
        size = sum((SHIPPED / folder / name).stat().st_size for name in files)
        assert size == measured.file_bytes == entry["file_bytes"], folder
        assert measured.accuracy == entry["accuracy"], folder


def test_the_report_ran_the_committed_recipe(report):
    from compressed_perception.compress.recipe import load_recipe

    assert report.recipe == load_recipe(ROOT / "config" / "build.yaml").to_dict()


def test_default_order_puts_accurate_artifacts_first(report):
    order = json.loads((MODELS / "default.json").read_text())["artifacts"]
    assert order[-1] == "nanodet_g/manifest.json"  # the FP32 original, always runnable
    accuracy = {m.path: m.accuracy for m in report.measurements}
    latency = []
    for relative in order[:-1]:
        manifest = load_manifest(MODELS / relative)
        manifest.verify()
        row = json.loads((SHIPPED / "shipped.json").read_text())["artifacts"][manifest.folder.name]
        assert row["accuracy"]["map"] >= MIN_MAP and row["accuracy"]["map50"] >= MIN_MAP50
        assert accuracy[row["build_path"]] == row["accuracy"]
        latency.append(row["latency_ms"]["p50"])
    assert latency == sorted(latency)


def test_no_model_named_means_the_default_and_a_name_its_shipped_folder():
    # which default each backend gets: test_cli.test_default_model_follows_the_backend_asked_for
    assert resolve_model(None) == default_model()
    assert resolve_model("") == default_model()
    assert resolve_model("nanodet_g") == MODELS / "nanodet_g" / "manifest.json"


def test_a_tampered_shipped_file_is_refused_naming_it(tmp_path, record):
    import shutil

    folder = next(iter(record["artifacts"]))
    copy = tmp_path / folder
    shutil.copytree(SHIPPED / folder, copy)
    manifest = load_manifest(copy)
    name = next(iter(manifest.checksums))
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 3] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
        load_manifest(copy).verify()
