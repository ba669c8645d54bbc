"""The ONNX rules TensorRT applies, checked on graphs here where TensorRT cannot run."""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx", reason="graph rules read ONNX files (the build extra)")
import numpy as np  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from compressed_perception.compress import graph_rules  # noqa: E402
from compressed_perception.compress.quantize import KeepSettings, exact_patterns, kept_nodes  # noqa: E402

from conftest import MODEL_DIR, conv_graph, conv_model  # noqa: E402


def _fp32(cast_first=True):
    return conv_graph(cast_first, int8_input=False, int8_weights=False)


def test_uint8_input_must_be_cast_first():
    assert graph_rules.uint8_violations(_fp32()) == []
    found = graph_rules.uint8_violations(_fp32(cast_first=False))
    assert len(found) == 1 and "'permute' (Transpose)" in found[0] and "Cast" in found[0]


def test_shipped_model_casts_its_uint8_input_first():
    model = graph_rules.load(MODEL_DIR / "nanodet_g.onnx")
    assert graph_rules.uint8_violations(model) == []
    assert model.graph.node[0].op_type == "Cast"


def test_int8_convolutions_are_counted_from_the_graph():
    assert graph_rules.convolutions(conv_graph()).int8 == ("conv",)
    plain = graph_rules.convolutions(_fp32())
    assert plain.int8 == () and plain.other == ("conv",)


def test_preflight_refuses_what_tensorrt_would():
    assert graph_rules.qdq_preflight(conv_graph(), kept=[]) == []
    bad = graph_rules.qdq_preflight(_fp32(cast_first=False), kept=[])
    assert any("UINT8" in f for f in bad)
    assert any("no INT8 convolution" in f for f in bad)
    assert any("'conv' is not INT8" in f for f in bad)
    # kept in higher precision on purpose: not a violation, but a model with no INT8 is
    assert not any("'conv' is not INT8" in f for f in graph_rules.qdq_preflight(
        _fp32(), kept=["conv"]))  # fmt: skip


def test_old_opset_is_refused():
    model = conv_graph()
    model.opset_import[0].version = 12
    assert any("opset 12" in f for f in graph_rules.qdq_preflight(model, kept=[]))


def _fp16_network(weight_scale):
    """An FP16 convolution whose weights' DequantizeLinear has a scale of `weight_scale`; an
    FP32 scale needs a Cast before the conv, which breaks TensorRT's INT8 fusion."""
    half = numpy_helper.from_array(np.array(0.1, np.float16), "s16")
    weight_dq_scale = numpy_helper.from_array(
        np.array(0.1, np.float16 if weight_scale == TensorProto.FLOAT16 else np.float32), "sw"
    )
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT16, name="cast"),
        helper.make_node("Transpose", ["f"], ["x"], perm=[0, 3, 1, 2], name="permute"),
        helper.make_node("QuantizeLinear", ["x", "s16", "zpu"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "s16", "zpu"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "sw", "zp8"], ["wd"], name="dq_w"),
    ]
    if weight_scale == TensorProto.FLOAT16:
        nodes.append(helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv"))
    else:
        nodes += [
            helper.make_node("Cast", ["wd"], ["w16"], to=TensorProto.FLOAT16, name="cast_w"),
            helper.make_node("Conv", ["xd", "w16"], ["y"], name="conv"),
        ]
    inits = [
        half,
        weight_dq_scale,
        numpy_helper.from_array(np.ones((2, 3, 1, 1), np.int8), "w_q"),
        numpy_helper.from_array(np.array(0, np.int8), "zp8"),
        numpy_helper.from_array(np.array(128, np.uint8), "zpu"),
    ]
    return conv_model(nodes, inits, TensorProto.FLOAT16)


def test_scale_type_must_match_the_network():
    good = _fp16_network(TensorProto.FLOAT16)
    assert graph_rules.scale_type_violations(good) == []
    assert graph_rules.qdq_preflight(good, kept=[]) == []
    bad = _fp16_network(TensorProto.FLOAT)
    found = graph_rules.scale_type_violations(bad)
    assert found == ["node 'dq_w': DequantizeLinear scale is FLOAT in a FLOAT16 network"]
    # the Cast between DequantizeLinear and the conv also costs the conv its INT8 status
    assert graph_rules.convolutions(bad).int8 == ()


def test_kept_patterns_match_whole_names_only():
    model = graph_rules.load(MODEL_DIR / "nanodet_g.onnx")
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert "node_conv2d_1" in convs and "node_conv2d_10" in convs
    kept = kept_nodes(
        model, KeepSettings(first_conv=False, head_outputs=False, nodes=("node_conv2d_1",))
    )
    assert kept == ["node_conv2d_1"]
    # the patterns handed to ModelOpt, which applies them with re.match (a prefix match)
    import re

    patterns = exact_patterns(kept)
    assert [c for c in convs if any(re.match(p, c) for p in patterns)] == ["node_conv2d_1"]
    unanchored = [c for c in convs if re.match(re.escape("node_conv2d_1"), c)]
    assert len(unanchored) > 1  # what the old, unanchored pattern excluded
