"""The imported PyTorch module against a plain NumPy reading of the TF.js graph."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the imported model needs the build extra (torch)")

from compressed_perception.errors import ModelError  # noqa: E402
from compressed_perception.models.tfjs import TfjsGraph  # noqa: E402
from compressed_perception.runtime.preprocess import Letterbox  # noqa: E402

from conftest import MODEL_DIR, original_model  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def graph() -> TfjsGraph:
    return TfjsGraph(MODEL_DIR / "source" / "nanodet.json")


def _network_input(image: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    letterbox = Letterbox(416, 416)
    letterbox(image)
    x = (letterbox.buffer[0].astype(np.float32) - np.float32(mean)) / np.float32(std)
    return x.transpose(2, 0, 1)[None].copy()


@pytest.mark.parametrize("index", [0, 13, 26, 39])
def test_module_matches_tfjs_graph_on_real_frames(graph, frames, index):
    model = original_model()
    x = _network_input(frames[index], model.config.mean, model.config.std)
    reference = graph.run({"input_1": x})
    with torch.no_grad():
        levels = model(torch.from_numpy(x))
    # The graph's outputs: Identity..Identity_2 class scores, Identity_3..5 box logits.
    for level, (cls, box) in enumerate(levels):
        scores = torch.sigmoid(cls).flatten(2).transpose(1, 2).numpy()
        boxes = box.flatten(2).transpose(1, 2).numpy()
        ref_scores = reference["Identity" + (f"_{level}" if level else "")]
        ref_boxes = reference[f"Identity_{level + 3}"]
        assert scores.shape == ref_scores.shape
        assert boxes.shape == ref_boxes.shape
        assert np.abs(scores - ref_scores).max() < TOLERANCE
        assert np.abs(boxes - ref_boxes).max() < TOLERANCE
    # A real frame of a busy street must give confident people: guards against two
    # implementations agreeing on garbage (e.g. both fed an all-padding input).
    assert reference["Identity"][0, :, 0].max() > 0.5


def test_graph_uses_only_interpreted_ops(graph):
    ops = {node.op for node in graph.nodes}
    assert ops == {
        "Const", "Placeholder", "Transpose", "Add", "AddV2", "Conv2D", "Pad", "PadV2",
        "LeakyRelu", "ConcatV2", "SparseToDense", "Reshape", "Identity", "ResizeBilinear",
        "SplitV", "Sigmoid", "MaxPool",
    }  # fmt: skip


def test_truncated_weights_are_refused(tmp_path):
    (tmp_path / "nanodet.json").write_bytes((MODEL_DIR / "source" / "nanodet.json").read_bytes())
    data = (MODEL_DIR / "source" / "nanodet.bin").read_bytes()
    (tmp_path / "nanodet.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"nanodet\.bin: truncated"):
        TfjsGraph(tmp_path / "nanodet.json")


def test_missing_weights_file_is_named(tmp_path):
    (tmp_path / "nanodet.json").write_bytes((MODEL_DIR / "source" / "nanodet.json").read_bytes())
    with pytest.raises(ModelError, match=r"nanodet\.bin: cannot read weight file"):
        TfjsGraph(tmp_path / "nanodet.json")


def test_not_a_graph_model(tmp_path):
    path = tmp_path / "model.json"
    path.write_text('{"format": "layers-model"}')
    with pytest.raises(ModelError, match=r"not a TF\.js graph model"):
        TfjsGraph(path)
