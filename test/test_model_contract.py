"""The flattened cell order of the model contract: stride 8 first, row-major within a level,
each cell's logits beside the centre that decodes its box."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch model needs the torch extra")

from compressed_perception.models.nanodet import (  # noqa: E402
    DeployModel,
    NanoDet,
    NanoDetConfig,
    flatten_levels,
)


def test_cells_are_stride_8_first_and_row_major():
    config = NanoDetConfig(num_classes=3, input_size=(64, 96))
    levels = []
    for rows, cols in config.grid_sizes():
        cls = torch.randn(2, 3, rows, cols)
        box = torch.randn(2, 4 * (config.reg_max + 1), rows, cols)
        levels.append((cls, box))
    flat_cls, flat_box = flatten_levels(levels)
    centers = DeployModel(NanoDet(config)).centers
    index = 0
    for (cls, box), stride in zip(levels, config.strides, strict=True):
        for y in range(cls.shape[2]):
            for x in range(cls.shape[3]):
                assert torch.equal(flat_cls[:, index], cls[:, :, y, x])
                assert torch.equal(flat_box[:, index], box[:, :, y, x])
                assert centers[index].tolist() == [(x + 0.5) * stride, (y + 0.5) * stride]
                index += 1
    assert index == flat_cls.shape[1] == flat_box.shape[1]
