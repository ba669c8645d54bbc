"""NanoDet family detector (CSP backbone, PAN neck, shared class/box GFL head) in PyTorch.

Every convolution is a named `nn.Conv2d` with a bias (batch norm folded), so structured
pruning can follow the channel dependencies and the layers can be addressed by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressed_perception.errors import ConfigError


@dataclass(frozen=True)
class NanoDetConfig:
    """Architecture hyper-parameters; the defaults are NanoDet-g (COCO, 416x416).

    `stages` lists the CSP stages as (channels, residual blocks, stride); the outputs
    of the last three stages (channels doubled by the CSP concatenation) feed the neck.
    """

    num_classes: int = 80
    input_size: tuple[int, int] = (416, 416)  # height, width
    stem_channels: int = 32
    stages: tuple[tuple[int, int, int], ...] = ((32, 1, 1), (64, 2, 2), (128, 2, 2), (256, 3, 2))
    neck_channels: int = 128
    reg_max: int = 10
    strides: tuple[int, ...] = (8, 16, 32)
    leaky_slope: float = 0.1
    mean: tuple[float, float, float] = (103.53, 116.28, 123.675)  # BGR
    std: tuple[float, float, float] = (57.375, 57.12, 58.395)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.stages) < len(self.strides):
            raise ConfigError(f"{len(self.strides)} strides need at least as many CSP stages")
        height, width = self.input_size
        if height % max(self.strides) or width % max(self.strides):
            raise ConfigError(
                f"input_size {self.input_size} must be a multiple of the largest stride"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NanoDetConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown NanoDet config keys: {sorted(unknown)}")
        tuples = {"input_size", "strides", "mean", "std"}
        values = {k: tuple(v) if k in tuples else v for k, v in data.items()}
        if "stages" in values:
            values["stages"] = tuple(tuple(s) for s in values["stages"])
        return cls(**values)

    def grid_sizes(self) -> list[tuple[int, int]]:
        height, width = self.input_size
        return [(height // s, width // s) for s in self.strides]


class ConvAct(nn.Module):
    """Convolution with folded batch norm, then LeakyReLU (or nothing)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, slope: float | None = 0.1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=True)
        self.act = nn.LeakyReLU(slope) if slope is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class TinyResBlock(nn.Module):
    """Halve the channels, one more convolution, and concatenate both halves."""

    def __init__(self, channels: int, slope: float) -> None:
        super().__init__()
        self.in_conv = ConvAct(channels, channels // 2, 3, slope=slope)
        self.mid_conv = ConvAct(channels // 2, channels // 2, 3, slope=slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        return torch.cat((self.mid_conv(x), x), dim=1)


class CspBlock(nn.Module):
    """Cross-stage partial block: output channels are twice the input channels."""

    def __init__(self, channels: int, blocks: int, stride: int, slope: float) -> None:
        super().__init__()
        self.in_conv = ConvAct(channels, channels, 3, stride, slope=slope)
        self.res_blocks = nn.Sequential(*(TinyResBlock(channels, slope) for _ in range(blocks)))
        self.res_out_conv = ConvAct(channels, channels, 3, slope=slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        return torch.cat((self.res_out_conv(self.res_blocks(x)), x), dim=1)


class CspBackbone(nn.Module):
    """Stem convolution, max-pool, CSP stages; returns the last `outputs` stage maps."""

    def __init__(self, config: NanoDetConfig) -> None:
        super().__init__()
        slope = config.leaky_slope
        self.stem = ConvAct(3, config.stem_channels, 3, stride=2, slope=slope)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stages = nn.ModuleList(
            CspBlock(channels, blocks, stride, slope) for channels, blocks, stride in config.stages
        )
        self.outputs = len(config.strides)

    def out_channels(self) -> list[int]:
        return [2 * stage.in_conv.conv.out_channels for stage in self.stages][-self.outputs :]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.pool(self.stem(x))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features[-self.outputs :]


class Pan(nn.Module):
    """Path aggregation with 1x1 lateral projections and bilinear resizing, no extra convs."""

    def __init__(self, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        maps = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
        for i in range(len(maps) - 1, 0, -1):  # top-down
            maps[i - 1] = maps[i - 1] + _resize_like(maps[i], maps[i - 1])
        for i in range(len(maps) - 1):  # bottom-up
            maps[i + 1] = maps[i + 1] + _resize_like(maps[i], maps[i + 1])
        return maps


def _resize_like(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=target.shape[-2:], mode="bilinear", align_corners=False)


class GflHead(nn.Module):
    """Per level one 3x3 conv, then a 1x1 conv giving class logits and box distributions."""

    def __init__(self, config: NanoDetConfig) -> None:
        super().__init__()
        channels = config.neck_channels
        outputs = config.num_classes + 4 * (config.reg_max + 1)
        self.num_classes = config.num_classes
        self.convs = nn.ModuleList(
            ConvAct(channels, channels, 3, slope=config.leaky_slope) for _ in config.strides
        )
        self.preds = nn.ModuleList(nn.Conv2d(channels, outputs, 1) for _ in config.strides)

    def forward(self, maps: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        outputs = []
        for conv, pred, x in zip(self.convs, self.preds, maps, strict=True):
            out = pred(conv(x))
            outputs.append((out[:, : self.num_classes], out[:, self.num_classes :]))
        return outputs


class NanoDet(nn.Module):
    """Raw detector: normalized NCHW float in, per level (class logits, box logits) out.

    Class logits are (B, C, H, W); box logits are (B, 4 * (reg_max + 1), H, W) with the
    four sides (left, top, right, bottom) each a distribution over reg_max + 1 bins.
    """

    def __init__(self, config: NanoDetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NanoDetConfig()
        self.backbone = CspBackbone(self.config)
        self.neck = Pan(self.backbone.out_channels(), self.config.neck_channels)
        self.head = GflHead(self.config)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.head(self.neck(self.backbone(x)))


class DeployModel(nn.Module):
    """The model I/O contract shared by every backend.

    `images` uint8 (B, H, W, 3) BGR, letterboxed by the host, goes in; normalization
    and layout change happen here so that an accelerator does them. Out come `boxes`
    (B, N, 4) x1, y1, x2, y2 in network-input pixels and `scores` (B, N, C) after the
    sigmoid, N being every cell of every level, stride 8 first.
    """

    def __init__(self, model: NanoDet) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(config.std).view(1, 3, 1, 1))
        self.register_buffer("bins", torch.arange(config.reg_max + 1, dtype=torch.float32))
        self.register_buffer("centers", _cell_centers(config))
        self.register_buffer("cell_strides", _cell_strides(config))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Cast first: TensorRT allows UINT8 only as a graph input, so the layer that reads
        # it must be a Cast (a Transpose of UINT8 is an intermediate UINT8 tensor).
        x = (images.float().permute(0, 3, 1, 2) - self.mean) * self.inv_std
        logits, dist = flatten_levels(self.model(x))
        batch, cells, _ = dist.shape
        dist = dist.reshape(batch, cells, 4, self.bins.numel()).softmax(dim=-1)
        distances = (dist @ self.bins) * self.cell_strides  # (B, N, 4): l, t, r, b
        lt = self.centers - distances[..., :2]
        rb = self.centers + distances[..., 2:]
        return torch.cat((lt, rb), dim=-1), logits.sigmoid()


def with_input_size(model: NanoDet, input_size: tuple[int, int]) -> NanoDet:
    """`model` (in place) fed `input_size` (height, width): the network is fully
    convolutional, only its decoding grid depends on the size."""
    model.config = replace(model.config, input_size=input_size)
    return model


def flatten_levels(
    levels: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level maps to (B, N, C) class logits and (B, N, 4 * bins) box logits, stride 8 first.

    Each level goes channels-last before the concatenation: an INT8 CPU runtime already
    holds convolution outputs channels-last, so the permute is free there, where one
    transpose of the concatenated maps cost OpenVINO 14 % of its INT8 latency (measured).
    """
    cls = torch.cat([c.permute(0, 2, 3, 1).flatten(1, 2) for c, _ in levels], dim=1)
    box = torch.cat([b.permute(0, 2, 3, 1).flatten(1, 2) for _, b in levels], dim=1)
    return cls, box


def _cell_centers(config: NanoDetConfig) -> torch.Tensor:
    centers = []
    for (rows, cols), stride in zip(config.grid_sizes(), config.strides, strict=True):
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        grid = torch.stack((xs.flatten(), ys.flatten()), dim=-1).float()
        centers.append((grid + 0.5) * stride)
    return torch.cat(centers)


def _cell_strides(config: NanoDetConfig) -> torch.Tensor:
    counts = [rows * cols for rows, cols in config.grid_sizes()]
    strides = [torch.full((n, 1), float(s)) for n, s in zip(counts, config.strides, strict=True)]
    return torch.cat(strides)
