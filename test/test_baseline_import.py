"""Reproducing the committed FP32 artifact from its TF.js source, and refusing bad sources."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch", reason="importing the baseline needs the build extra (torch)")

from compressed_perception.compress.baseline import SOURCE_FILES, build_baseline  # noqa: E402
from compressed_perception.errors import IntegrityError, ModelError  # noqa: E402
from compressed_perception.models.checkpoint import load_checkpoint  # noqa: E402
from compressed_perception.runtime.manifest import load_manifest, sha256_file  # noqa: E402

from conftest import MODEL_DIR, original_model  # noqa: E402


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    out = tmp_path_factory.mktemp("import") / "nanodet_g"
    return build_baseline(MODEL_DIR / "source", out)


def test_rebuild_reproduces_committed_weights(rebuilt):
    committed = original_model().state_dict()
    fresh = load_checkpoint(rebuilt.artifact("torch")).state_dict()
    assert committed.keys() == fresh.keys()
    for name, tensor in committed.items():
        assert torch.equal(tensor, fresh[name]), name


def test_manifest_describes_the_contract(rebuilt):
    data = json.loads(rebuilt.path.read_text())
    assert data["input"] == {
        "name": "images",
        "shape": [1, 416, 416, 3],
        "dtype": "uint8",
        "layout": "NHWC",
        "color": "BGR",
    }
    assert data["outputs"] == {"boxes": "boxes", "scores": "scores"}
    assert len(data["classes"]) == 80
    assert data["classes"][0] == "person"
    assert data["precision"] == "fp32"
    assert data["source"]["files"] == SOURCE_FILES
    for artifact in data["artifacts"].values():
        assert sha256_file(rebuilt.folder / artifact["file"]) == artifact["sha256"]


def test_committed_manifest_matches_committed_files():
    manifest = load_manifest(MODEL_DIR)
    assert manifest.artifact("onnx").name == "nanodet_g.onnx"
    assert manifest.artifact("torch").name == "nanodet_g.pt"


def test_tampered_source_is_refused_and_nothing_written(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(MODEL_DIR / "source", source)
    data = bytearray((source / "nanodet.bin").read_bytes())
    data[1000] ^= 0xFF
    (source / "nanodet.bin").write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match=r"nanodet\.bin: sha256"):
        build_baseline(source, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [source]


def test_missing_source_and_bad_tarball(tmp_path):
    with pytest.raises(ModelError, match="no such tarball or folder"):
        build_baseline(tmp_path / "absent.tgz", tmp_path / "out")
    bogus = tmp_path / "bogus.tgz"
    bogus.write_bytes(b"not a tarball")
    with pytest.raises(ModelError, match="unreadable tarball"):
        build_baseline(bogus, tmp_path / "out")
    assert not (tmp_path / "out").exists()
