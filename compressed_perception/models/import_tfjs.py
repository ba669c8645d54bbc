"""Import NanoDet weights from a TF.js graph model into the PyTorch module.

The graph is an ONNX-to-TF conversion: its Conv2D nodes are numbered in the order the
original network executed them, each followed by an Add of its folded bias. The module
records its own execution order with hooks, and the two are paired one to one, with
every shape checked, so a wrong pairing cannot pass silently.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from compressed_perception.errors import ModelError
from compressed_perception.models.hooks import hooked
from compressed_perception.models.nanodet import NanoDet, NanoDetConfig
from compressed_perception.models.tfjs import TfjsGraph

_CONV_NAME = re.compile(r"(?:^|/)convolution(?:_(\d+))?$")


def graph_convolutions(graph: TfjsGraph) -> list[tuple[np.ndarray, np.ndarray]]:
    """(HWIO kernel, bias) per Conv2D node, in the graph's numbering order."""
    consumers: dict[str, list[str]] = {}
    for node in graph.nodes:
        for ref in node.inputs:
            consumers.setdefault(ref, []).append(node.name)
    by_name = {node.name: node for node in graph.nodes}
    numbered = []
    for node in graph.nodes:
        if node.op != "Conv2D":
            continue
        match = _CONV_NAME.search(node.name)
        if match is None:
            raise ModelError(f"{graph.path}: Conv2D node {node.name!r} has an unexpected name")
        kernel = graph.weights[node.inputs[1]]
        adds = [by_name[c] for c in consumers.get(node.name, []) if by_name[c].op == "Add"]
        if len(adds) != 1:
            raise ModelError(f"{graph.path}: Conv2D {node.name!r} is not followed by one bias Add")
        bias_ref = next(ref for ref in adds[0].inputs if ref != node.name)
        numbered.append((int(match.group(1) or 0), kernel, graph.weights[bias_ref]))
    numbered.sort(key=lambda item: item[0])
    return [(kernel, bias) for _, kernel, bias in numbered]


def execution_order(model: nn.Module) -> list[nn.Conv2d]:
    """The module's convolutions in the order one forward pass runs them."""
    order: list[nn.Conv2d] = []

    def record(conv: nn.Module, _inputs: object, _output: object) -> None:
        order.append(conv)

    height, width = getattr(model, "config", NanoDetConfig()).input_size
    convs = (m for m in model.modules() if isinstance(m, nn.Conv2d))
    with hooked((conv, record) for conv in convs), torch.no_grad():
        model(torch.zeros(1, 3, height, width))
    return order


def import_nanodet(graph: TfjsGraph, config: NanoDetConfig | None = None) -> NanoDet:
    """Build the module and copy every convolution's kernel and bias from the graph."""
    model = NanoDet(config or NanoDetConfig()).eval()
    convs = execution_order(model)
    source = graph_convolutions(graph)
    if len(source) != len(convs):
        raise ModelError(
            f"{graph.path}: graph has {len(source)} convolutions, the module {len(convs)}"
        )
    names = {module: name for name, module in model.named_modules()}
    for index, (conv, (kernel, bias)) in enumerate(zip(convs, source, strict=True)):
        weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        if weight.shape != conv.weight.shape or bias.shape != (conv.out_channels,):
            raise ModelError(
                f"{graph.path}: convolution {index} has kernel {tuple(weight.shape)} and bias "
                f"{bias.shape}, module layer {names[conv]} expects {tuple(conv.weight.shape)}"
            )
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return model
