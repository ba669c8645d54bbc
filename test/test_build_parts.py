"""Recipe, stage cache, frame sources, quantization node choice and distillation, each alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the build's parts need the build extra")
pytest.importorskip("torch", reason="the build's parts need the build extra")

from compressed_perception.compress.build import plan, resolve_device  # noqa: E402
from compressed_perception.compress.cache import RECORD, StageCache  # noqa: E402
from compressed_perception.compress.quantize import (  # noqa: E402
    KeepSettings,
    OrtSettings,
    QdqSettings,
    kept_nodes,
    quantize_ort,
)
from compressed_perception.compress.recipe import load_recipe, parse_recipe  # noqa: E402
from compressed_perception.datasets import DatasetError, FrameSource, load_frames  # noqa: E402
from compressed_perception.errors import ConfigError  # noqa: E402
from compressed_perception.runtime.manifest import Manifest  # noqa: E402

from conftest import FRAMES_DIR, MODEL_DIR, ROOT  # noqa: E402

RECIPE = ROOT / "config" / "build.yaml"
SAMPLE_BAG = ROOT / "data" / "sample_bag"


def test_default_recipe_and_quick_overrides():
    full = load_recipe(RECIPE)
    quick = load_recipe(RECIPE, quick=True)
    assert full.train.source == "vtest" and (full.train.start, full.train.stop) == (0, 400)
    assert (full.evaluate.start, full.evaluate.stop) == (400, 795)
    assert full.stage("quantize_qdq").calibration_frames >= 300
    assert quick.stage("distill").steps < full.stage("distill").steps
    assert quick.stage("distill").lr == full.stage("distill").lr  # merged, not replaced
    assert full.stage("prune").macs <= 0.6
    assert Path(quick.train.source) == RECIPE.parent / "../data/sample_bag"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prunee": {}}, "unknown sections"),
        ({"prune": {"macs": 0.3, "mac": 1}}, "unknown keys"),
        ({"prune": {"macs": 1.5}}, "outside"),
        ({"distill": {"steps": -1}}, "steps"),
        ({"distill": {"steps": "many"}}, "distill: steps must be a whole number, got 'many'"),
        ({"prune": {"macs": "half"}}, "prune: macs must be a number, got 'half'"),
        ({"prune": {"scan_ratios": [0.5, "x"]}}, "scan_ratios must be a list of numbers"),
        ({"distill": {"flip": "yes"}}, "distill: flip must be true or false, got 'yes'"),
        ({"train": {"stop": "end"}}, "train: stop must be a whole number or null"),
        ({"device": "gpu"}, "device: 'gpu' is not one of auto, cpu, cuda"),
        ({"quantize_ort": {"calibration_frames": 2}}, "too few"),
        ({"quantize_qdq": {"method": "percentile"}}, "quantize_qdq method: 'percentile' is not"),
        ({"quantize_qdq": {"high_precision": "int4"}}, "'int4' is not one of fp16, fp32"),
        ({"quantize_ort": {"method": "max"}}, "quantize_ort method: 'max' is not one of minmax"),
        ({"quantize_openvino": {"preset": "fast"}}, "preset: 'fast' is not one of mixed"),
        ({"quantize_openvino": {"inference_precision": "f8"}}, "inference_precision: 'f8' is"),
        ({"bench": None}, "cannot be null"),
        ({"train": {"source": "x", "start": 5, "stop": 5}}, "select nothing"),
        ({"source": 3}, "manifest path"),
    ],
)
def test_bad_recipes_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(data, "recipe.yaml")


def test_unreadable_recipe_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_recipe(bad)


def test_null_stage_is_skipped():
    recipe = parse_recipe({"prune": None, "distill": None}, "r")
    assert recipe.stage("prune") is None and recipe.stage("distill") is None
    assert recipe.stage("reconstruct") is not None


def _source(checksums):
    return Manifest(name="m", classes=("a",), precision="fp32", artifacts={}, checksums=checksums)


def test_cache_keys_of_stages_whose_output_did_not_change_are_stable():
    """The stage registry must not move cache keys: these are the keys the build used
    before stages were registered (ONNX Runtime INT8 of an unpruned model), and since
    Q/DQ's key moved on purpose (revision 2: its first revision, 5e5197670d8a0d30,
    excluded every convolution) and OpenVINO's stage came; fit_input, registered since, is
    off here, as it was then."""
    source = _source({"model.onnx": "a" * 64, "model.pt": "b" * 64})
    off = {"fit_input": None, "prune": None, "reconstruct": None, "distill": None}
    recipe = parse_recipe(off, "r")
    keys = dict(plan(recipe, source))
    assert keys["ort-int8"] == "ca2c7cc190ad34ce"
    assert keys["quantize_qdq"] == "833d7ca301827287"
    assert keys["openvino-int8"] == "96aa58a9f32193b8"
    # nothing pruned: the same model as the student
    assert not {"ort-int8-unpruned", "quantize_qdq-unpruned"} & set(keys)


def test_a_changed_setting_moves_only_the_keys_after_it():
    source = _source({"model.onnx": "a" * 64, "model.pt": "b" * 64})
    recipe = load_recipe(ROOT / "config" / "build.yaml")
    before = dict(plan(recipe, source))
    distill = recipe.stage("distill")
    changed = dict(
        plan(
            recipe.with_stage("distill", type(distill)(**{**distill.__dict__, "lr": 1e-5})), source
        )
    )
    same = {name for name in before if before[name] == changed[name]}
    unpruned = {"ort-int8-unpruned", "openvino-int8-unpruned", "quantize_qdq-unpruned"}
    assert same == {"fit_input", "prune", "reconstruct", *unpruned}


def test_a_fitted_input_stands_for_the_original_in_the_unpruned_variants():
    """fit_input changes how the original is fed, not what it is: the unpruned INT8 models
    are made from it, and with nothing else changing the model they are not made twice."""
    source = _source({"model.onnx": "a" * 64, "model.pt": "b" * 64})
    recipe = load_recipe(ROOT / "config" / "build.yaml")
    fitted = dict(plan(recipe, source))
    unfitted = dict(plan(recipe.with_stage("fit_input", None), source))
    for name in ("ort-int8-unpruned", "openvino-int8-unpruned", "quantize_qdq-unpruned"):
        assert fitted[name] != unfitted[name], name
    untrained = {"prune": None, "reconstruct": None, "distill": None}
    only = dict(plan(parse_recipe(untrained, "r"), source))
    assert "fit_input" in only and "ort-int8" in only and "ort-int8-unpruned" not in only


def test_keys_name_the_inputs_not_the_machine():
    """A student pruned and distilled on a GPU is served to the same recipe's CPU build."""
    source = _source({"model.onnx": "a" * 64, "model.pt": "b" * 64})
    keys = {d: plan(parse_recipe({"device": d}, "r"), source) for d in ("cpu", "cuda", "auto")}
    assert keys["cpu"] == keys["cuda"] == keys["auto"]
    assert {"prune", "reconstruct", "distill"} <= dict(keys["cpu"]).keys()


def test_device_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"recipe device: cuda, but torch .* sees no CUDA device"):
        resolve_device(parse_recipe({"device": "cuda"}, "r"))
    assert resolve_device(parse_recipe({"device": "auto"}, "r")) == "cpu"


def test_cache_serves_only_identical_inputs(tmp_path):
    cache = StageCache(tmp_path)
    calls = []

    def produce(folder: Path) -> dict[str, int]:
        calls.append(folder)
        (folder / "out.txt").write_text("x")
        return {"n": len(calls)}

    first = cache.run("s", {"a": 1}, produce)
    again = cache.run("s", {"a": 1}, produce)
    changed = cache.run("s", {"a": 2}, produce)
    assert not first.cached and again.cached and not changed.cached
    assert again.folder == first.folder and again.info == {"n": 1}
    assert changed.folder != first.folder and len(calls) == 2
    assert json.loads((first.folder / RECORD).read_text())["inputs"] == {"a": 1}


def test_failed_stage_leaves_nothing_to_serve(tmp_path):
    cache = StageCache(tmp_path)

    def crash(folder: Path) -> dict[str, int]:
        (folder / "half.onnx").write_text("partial")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        cache.run("s", {"a": 1}, crash)
    assert not any(p.name.startswith("s-") for p in cache.root.iterdir())
    result = cache.run("s", {"a": 1}, lambda folder: {"ok": True})
    assert not result.cached


def test_frames_from_folder_and_bag_with_ranges():
    folder = load_frames(FrameSource(str(FRAMES_DIR), start=2, stop=10, step=3))
    assert len(folder) == 3 and folder[0].shape == (576, 768, 3)
    bag = load_frames(FrameSource(str(SAMPLE_BAG), start=0, stop=40, step=10))
    assert len(bag) == 4 and bag[0].shape == (288, 384, 3) and bag[0].dtype == np.uint8


@pytest.mark.parametrize(("dx", "dy"), [(3, 0), (-3, 0), (0, 2), (0, -2), (-2, 1)])
def test_a_moved_frame_keeps_its_size_and_repeats_its_edge(dx, dy):
    from compressed_perception.datasets import moved

    frame = np.arange(12 * 10 * 3, dtype=np.int32).reshape(12, 10, 3)
    view = moved(frame, dx, dy)
    assert view.shape == frame.shape
    # what stays in view is the frame, dx right and dy down
    rows, cols = slice(max(dy, 0), 12 + min(dy, 0)), slice(max(dx, 0), 10 + min(dx, 0))
    source = frame[max(-dy, 0) : 12 - max(dy, 0), max(-dx, 0) : 10 - max(dx, 0)]
    np.testing.assert_array_equal(view[rows, cols], source)
    # what the move uncovered repeats the nearest edge of what is in view
    if dx > 0:
        np.testing.assert_array_equal(view[:, :dx], np.repeat(view[:, dx : dx + 1], dx, axis=1))
    if dx < 0:
        np.testing.assert_array_equal(view[:, dx:], np.repeat(view[:, dx - 1 : dx], -dx, axis=1))
    if dy > 0:
        np.testing.assert_array_equal(view[:dy], np.repeat(view[dy : dy + 1], dy, axis=0))
    if dy < 0:
        np.testing.assert_array_equal(view[dy:], np.repeat(view[dy - 1 : dy], -dy, axis=0))
    assert moved(frame, 0, 0) is frame


def test_bad_frame_sources(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_frames(FrameSource(str(tmp_path / "missing")))
    with pytest.raises(DatasetError, match="at least 300 needed"):
        load_frames(FrameSource(str(FRAMES_DIR)), minimum=300)
    with pytest.raises(ConfigError, match="select nothing"):
        FrameSource("vtest", start=0, stop=10, step=0)


def test_kept_nodes_follow_the_graph_not_the_names():
    model = onnx.load(str(MODEL_DIR / "nanodet_g.onnx"))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    kept = kept_nodes(model, KeepSettings())
    head = [n.name for n in convs if "head.preds" in n.input[1]]
    assert kept[0] == convs[0].name and "stem" in convs[0].input[1]
    assert sorted(kept[1:]) == sorted(head) and len(head) == 3
    assert kept_nodes(model, KeepSettings(first_conv=False, head_outputs=False)) == []
    with pytest.raises(ConfigError, match="matches no node"):
        kept_nodes(model, KeepSettings(nodes=("no_such_node",)))


def test_quantize_refuses_too_little_calibration(tmp_path):
    source = MODEL_DIR / "nanodet_g.onnx"
    few = np.zeros((4, 416, 416, 3), np.uint8)
    with pytest.raises(ConfigError, match="4 frames given"):
        quantize_ort(source, tmp_path / "m.onnx", few, OrtSettings(calibration_frames=8))
    with pytest.raises(ConfigError, match="uint8"):
        quantize_ort(source, tmp_path / "m.onnx", few.astype(np.float32), OrtSettings())
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ConfigError, match="high_precision"):
        QdqSettings(high_precision="int4")


def _measurement(stage, backend, p50, accuracy=None, size=1000, macs=None, cpu=True):
    from compressed_perception.compress.report import Measurement

    return Measurement(
        stage, backend, None, macs, size, {"p50": p50, "p99": p50}, accuracy, "", cpu=cpu
    )


def test_targets_explain_what_fell_short(monkeypatch):
    from compressed_perception.compress import measure as measure_module
    from compressed_perception.compress.measure import best_cpu_artifact, curve, targets

    monkeypatch.setattr(measure_module, "isa_flags", lambda: ["avx2", "fma"])
    rows = [
        _measurement("fp32", "onnxruntime", 100.0, {"map": 1.0, "map50": 1.0}, 4000, 2000),
        _measurement("fp32", "torch", 150.0, cpu=False),
        _measurement("reconstructed", "onnxruntime", 50.0, {"map": 0.5, "map50": 0.6}, 2000, 1100),
        _measurement("distilled", "onnxruntime", 50.0, {"map": 0.7, "map50": 0.85}, 2000, 1100),
        _measurement("ort-int8", "onnxruntime", 52.0, {"map": 0.68, "map50": 0.84}, size=500),
        _measurement("ort-int8-unpruned", "onnxruntime", 105.0, {"map": 0.95, "map50": 0.98}),
        _measurement("qdq-int8", "onnxruntime", 60.0, {"map": 0.69, "map50": 0.85}, cpu=False),
    ]
    found = {t.name: t for t in targets(rows, 1000.0, quick=False)}
    assert found["student MACs / original"].measured == 0.55
    assert found["student MACs / original"].met
    after = found["agreement mAP@.5 after pruning and reconstruction"]
    assert after.measured == 0.6 and after.met is False
    assert (
        "after pruning and reconstruction (reconstructed) agreement is mAP 0.500"
        in after.explanation
    )
    latency = found["ort-int8 latency / ORT FP32"]
    assert latency.measured == 0.52 and latency.met is False
    assert "INT8 alone (onnxruntime, unpruned) runs at 1.05x" in latency.explanation
    assert "pruning alone (FP32 student on ORT) at 0.50x" in latency.explanation
    assert "this CPU has no VNNI" in latency.explanation
    assert found["ort-int8 latency / PyTorch FP32"].measured == pytest.approx(0.347)
    accuracy = found["ort-int8 agreement mAP"]
    assert accuracy.met is False and "the FP32 student reaches 0.700" in accuracy.explanation
    size = found["ort-int8 file / FP32 ONNX"]
    assert size.measured == 0.125 and size.met and size.explanation == ""
    assert found["build seconds (from scratch)"].met
    gained = found["distillation's change in agreement mAP (held out)"]
    assert gained.measured == 0.2 and gained.met
    # not measured: never a pass
    assert found["OpenVINO INT8 (unpruned) agreement mAP"].met is None
    # nothing fast enough is accurate enough: the vehicle gets the FP32 model
    assert best_cpu_artifact(rows).stage == "fp32"
    points = curve(rows)
    assert [p["MACs ratio"] for p in points] == [1.0, 0.55]
    assert points[1]["map"] == 0.68 and points[0]["latency_p50"] == 105.0


def test_a_slow_build_says_where_its_time_went(monkeypatch):
    from compressed_perception.compress import measure as measure_module
    from compressed_perception.compress.measure import targets

    monkeypatch.setattr(measure_module, "isa_flags", lambda: ["avx2", "fma"])
    rows = [_measurement("fp32", "onnxruntime", 100.0, {"map": 1.0, "map50": 1.0})]
    spent = {"prune": 210.5, "reconstruct": 572.4, "distill (fp32)": 710.7, "measuring": 565.0}
    slow = {t.name: t for t in targets(rows, 2228.0, quick=False, spent=spent)}
    build = slow["build seconds (from scratch)"]
    assert build.met is False
    assert build.explanation == (
        "of 2228 s, distill (fp32) 711 s, reconstruct 572 s, measuring 565 s; "
        "this CPU's vector ISA flags: avx2 fma"
    )
    fast = {t.name: t for t in targets(rows, 1000.0, quick=False, spent=spent)}
    assert fast["build seconds (from scratch)"].explanation == ""


def test_classes_that_hold_the_shortfall_are_named():
    import dataclasses

    from compressed_perception.compress.measure import CLASS_TABLE, MOVED, class_tables, targets

    def cls(boxes, near, map50):
        return {"boxes": boxes, "near": near, "map": map50 - 0.2, "map50": map50}

    student = dataclasses.replace(
        _measurement("reconstructed", "onnxruntime", 50.0, {"map": 0.6, "map50": 0.72}),
        classes={"person": cls(500, 40, 0.96), "car": cls(150, 3, 1.0), "bus": cls(5, 5, 0.2)},
    )
    moved = dataclasses.replace(
        _measurement(MOVED, "onnxruntime", 100.0, {"map": 0.78, "map50": 0.885}, cpu=False),
        latency_ms=None,
        classes={"person": cls(500, 40, 0.99), "car": cls(150, 3, 1.0), "bus": cls(5, 5, 0.6)},
    )
    rows = [_measurement("fp32", "onnxruntime", 100.0, {"map": 1.0, "map50": 1.0}), student]
    named = {t.name: t for t in targets([*rows, moved], 1000.0, quick=False)}
    why = named["student (FP32) agreement mAP@.5"].explanation
    assert "on the same frames moved by 1 px (right, or down), agrees at 0.780 / 0.885" in why
    assert "mean over the reference's 3 classes, and 1 below 0.9 (bus 0.20)" in why
    assert "hold 5 of its 655 boxes, 5 of them scored within 0.05 of its 0.35" in why
    assert "its other 2 classes average 0.980" in why
    table = class_tables(rows)[CLASS_TABLE]
    assert table["columns"][1:3] == ["reference boxes", "of them < 0.4"]
    assert table["rows"][2] == ["bus", 5, 5, "0.000 / 0.200"]
    with_yardstick = class_tables([*rows, moved])[CLASS_TABLE]
    assert with_yardstick["columns"][-1] == f"{MOVED} (onnxruntime) mAP / mAP@.5"
    assert with_yardstick["rows"][2] == ["bus", 5, 5, "0.000 / 0.200", "0.400 / 0.600"]
    # every class at or above the bar: nothing to explain by class
    good = dataclasses.replace(student, classes={"car": cls(150, 3, 1.0)})
    named = {t.name: t for t in targets([rows[0], good], 1000.0, quick=False)}
    assert "classes" not in named["student (FP32) agreement mAP@.5"].explanation
    assert class_tables(rows[:1]) == {}


def test_a_shortfall_names_what_the_input_trim_alone_gave():
    """The trim and the pruning both count towards the MACs budget: the report keeps them
    apart, so a pruned student's shortfall is not laid on the trim, or the reverse."""
    import dataclasses

    from compressed_perception.compress.measure import CLASS_TABLE, FITTED, class_tables, targets

    def row(stage, macs, person, bus):
        classes = {
            "person": {"boxes": 500, "near": 40, "map": person, "map50": person},
            "bus": {"boxes": 5, "near": 5, "map": bus, "map50": bus},
        }
        accuracy = {"map": (person + bus) / 2, "map50": (person + bus) / 2}
        measured = _measurement(stage, "onnxruntime", 50.0, accuracy, macs=macs)
        return dataclasses.replace(measured, classes=classes)

    original = _measurement("fp32", "onnxruntime", 100.0, {"map": 1.0, "map50": 1.0}, macs=2000)
    rows = [original, row(FITTED, 1692, 1.0, 0.98), row("reconstructed", 1200, 0.97, 0.3)]
    named = {t.name: t for t in targets(rows, 1000.0, quick=False)}
    why = named["student (FP32) agreement mAP"].explanation
    assert why.startswith(
        "the input trimmed to the camera's frames alone (fitted, 0.846x MACs) agrees at mAP "
        "0.990; after pruning and reconstruction (reconstructed) agreement is mAP 0.635"
    )
    table = class_tables(rows)[CLASS_TABLE]
    assert table["columns"][3:] == [
        "reconstructed (onnxruntime) mAP / mAP@.5",
        "fitted (onnxruntime) mAP / mAP@.5",
    ]
    assert table["rows"][1] == ["bus", 5, 5, "0.300 / 0.300", "0.980 / 0.980"]
    # without the trim nothing is said of it
    plain = {t.name: t for t in targets([original, rows[2]], 1000.0, quick=False)}
    assert "trimmed" not in plain["student (FP32) agreement mAP"].explanation


def test_distillation_that_lowers_held_out_agreement_is_reported():
    from compressed_perception.compress.measure import targets

    def found(distilled_map):
        rows = [
            _measurement("fp32", "onnxruntime", 100.0, {"map": 1.0, "map50": 1.0}, 4000, 2000),
            _measurement("reconstructed", "onnxruntime", 50.0, {"map": 0.6, "map50": 0.7}),
            _measurement("distilled", "onnxruntime", 50.0, {"map": distilled_map, "map50": 0.7}),
        ]
        named = {t.name: t for t in targets(rows, 1000.0, quick=False)}
        return named["distillation's change in agreement mAP (held out)"]

    assert found(0.6).met and found(0.6).explanation == ""
    harmed = found(0.55)
    assert harmed.measured == -0.05 and harmed.met is False
    assert "validation slice" in harmed.explanation


def test_a_distillation_fall_names_the_classes_it_comes_from():
    """At 0.9x MACs one bird box (1.000 -> 0.167) outweighed gains in nine classes."""
    import dataclasses

    from compressed_perception.compress.measure import CLASS_TABLE, class_tables, targets

    def model(stage, person, bird, sheep):
        classes = {
            "person": {"boxes": 2703, "near": 335, "map": person, "map50": 0.99},
            "bird": {"boxes": 1, "near": 1, "map": bird, "map50": bird},
            "sheep": {"boxes": 64, "near": 46, "map": sheep, "map50": 0.95},
        }
        accuracy = {"map": float(np.mean([person, bird, sheep])), "map50": 0.9}
        row = _measurement(stage, "onnxruntime", 50.0, accuracy)
        return dataclasses.replace(row, classes=classes)

    rows = [
        _measurement("fp32", "onnxruntime", 100.0, {"map": 1.0, "map50": 1.0}),
        model("reconstructed", 0.90, 1.0, 0.90),
        model("distilled", 0.92, 0.167, 0.93),
    ]
    named = {t.name: t for t in targets(rows, 1000.0, quick=False)}
    why = named["distillation's change in agreement mAP (held out)"].explanation
    assert why.endswith(
        "; the class mean falls by 0.278 through bird (1 reference box) 1.000 -> 0.167, "
        "and the other 2 classes change by +0.025 on average"
    )
    # the table shows the start beside the student, so each class's change can be read
    table = class_tables(rows)[CLASS_TABLE]
    assert table["columns"][3:5] == [
        "distilled (onnxruntime) mAP / mAP@.5",
        "reconstructed (onnxruntime) mAP / mAP@.5",
    ]
    assert table["rows"][1] == ["bird", 1, 1, "0.167 / 0.167", "1.000 / 1.000"]
    # a fall spread thinly over the classes names none of them
    even = [rows[0], rows[1], model("distilled", 0.886, 0.986, 0.886)]
    spread = {t.name: t for t in targets(even, 1000.0, quick=False)}
    fell = spread["distillation's change in agreement mAP (held out)"]
    assert fell.met is False and fell.explanation.endswith("than the model it started from")


def test_the_openvino_artifact_is_the_cpu_int8_artifact_when_built():
    from compressed_perception.compress.measure import targets

    rows = [
        _measurement("fp32", "onnxruntime", 100.0, {"map": 1.0, "map50": 1.0}, 4000, 2000),
        _measurement("ort-int8", "onnxruntime", 52.0, {"map": 0.8, "map50": 0.9}, size=500),
        _measurement("openvino-int8", "openvino", 30.0, {"map": 0.85, "map50": 0.95}, size=600),
    ]
    found = {t.name: t for t in targets(rows, 1000.0, quick=False)}
    assert found["openvino-int8 latency / ORT FP32"].measured == 0.3
    assert "ort-int8 latency / ORT FP32" not in found


def test_best_artifact_is_the_fastest_accurate_one():
    from compressed_perception.compress.measure import best_cpu_artifact

    rows = [
        _measurement("fp32", "onnxruntime", 100.0, {"map": 1.0, "map50": 1.0}),
        _measurement("ort-int8", "onnxruntime", 30.0, {"map": 0.8, "map50": 0.92}),
        _measurement("openvino-int8", "openvino", 25.0, {"map": 0.79, "map50": 0.95}),
        _measurement("qdq-int8", "onnxruntime", 20.0, {"map": 0.9, "map50": 0.95}, cpu=False),
    ]
    # Q/DQ is for TensorRT, not CPUs; OpenVINO's is faster but misses mAP 0.80
    assert best_cpu_artifact(rows).stage == "ort-int8"


def _coco_file(tmp_path, frame_paths, boxes):
    images = [
        {"id": i + 1, "file_name": p.name, "width": 768, "height": 576}
        for i, p in enumerate(frame_paths)
    ]
    annotations = [
        {"id": j + 1, "image_id": 1 + i, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1]}
        for j, (i, (x1, y1, x2, y2)) in enumerate(boxes)
    ]
    path = tmp_path / "labels.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "person"}],
            }
        )
    )
    return path


def test_labelled_data_gives_real_map(tmp_path, frame_paths, frames, manifest_path):
    from compressed_perception.compress.measure import Candidate, load_labelled, measure
    from compressed_perception.compress.recipe import BenchSettings, LabelSettings
    from compressed_perception.runtime.detector import Detector
    from compressed_perception.runtime.manifest import load_manifest

    detector = Detector.open(manifest_path, "onnxruntime")
    boxes = [
        (i, tuple(box))
        for i, frame in enumerate(frames[:3])
        for box, cls in zip(
            detector.detect(frame).detections.boxes.tolist(),
            detector.detect(frame).detections.class_ids.tolist(),
            strict=True,
        )
        if cls == 0
    ]
    coco = _coco_file(tmp_path, frame_paths[:3], boxes)
    manifest = load_manifest(manifest_path)
    labelled = load_labelled(LabelSettings(str(coco), str(FRAMES_DIR)), manifest.classes)
    assert len(labelled) == 3 and len(labelled[0][1].boxes) > 0
    rows = measure(
        [Candidate("fp32", manifest_path, None, None)],
        manifest,
        frames[:5],
        BenchSettings(iterations=1),
        tmp_path,
        progress=False,
        labelled=labelled,
    )
    ort = next(m for m in rows if m.backend == "onnxruntime")
    # labels made from this model's own person boxes: it finds them all
    assert ort.accuracy["labelled_map50"] > 0.95 and ort.accuracy["map"] == 1.0
    with pytest.raises(DatasetError, match=r"labels\.json not found"):
        load_labelled(LabelSettings(str(coco), str(tmp_path)), manifest.classes)


class _BrightSpot:
    """A detector of one thing only: a 'person' box 4 px wide on the frame's brightest pixel,
    or, `fixed`, always where that pixel was in the unmoved frame (it misses any move)."""

    def __init__(self, fixed=None):
        self.fixed = fixed

    def detect(self, image, name="image"):
        from types import SimpleNamespace

        from compressed_perception.runtime.postprocess import Detections

        y, x = self.fixed or np.unravel_index(np.argmax(image.sum(axis=2)), image.shape[:2])
        box = np.array([[x - 2, y - 2, x + 2, y + 2]], np.float32)
        found = Detections(box, np.array([0.9], np.float32), np.array([0], np.int64))
        return SimpleNamespace(detections=found)


def test_moving_the_frames_is_undone_before_they_are_compared(frames, manifest_path):
    """The moved-frames yardstick does no harm: unmoved, a detector agrees with itself
    perfectly; moved, boxes are moved back, so a detector that follows the move agrees
    perfectly and one that does not, does not."""
    from compressed_perception.compress.measure import moved_agreement
    from compressed_perception.runtime.detector import Detector

    real = Detector.open(manifest_path, "onnxruntime")
    expected = [real.detect(f).detections for f in frames[:6]]
    still = moved_agreement(real, frames[:6], expected, real.manifest.classes, (0, 0))
    assert (still.map, still.map50) == (1.0, 1.0)
    spot = np.zeros((48, 64, 3), np.uint8)
    spot[20, 30] = 255
    names = ["person"]
    reference = [_BrightSpot().detect(spot).detections]
    for move in ((1, 0), (0, 1), (3, 2)):
        followed = moved_agreement(_BrightSpot(), [spot], reference, names, move)
        assert followed.map == pytest.approx(1.0)
    blind = moved_agreement(_BrightSpot((20, 30)), [spot], reference, names, (1, 0))
    assert blind.map < 0.9  # a 4 px box 1 px off: IoU 0.6


def test_quick_section_cannot_nest():
    with pytest.raises(ConfigError, match=r"quick: unknown sections \['quick'\]"):
        parse_recipe({"quick": {"quick": {}}}, "recipe.yaml", quick=True)
