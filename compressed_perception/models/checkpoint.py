"""Checkpoints: architecture config plus weights, loadable without pickled code."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressed_perception.atomic import atomic_path
from compressed_perception.errors import ModelError
from compressed_perception.models.nanodet import NanoDet, NanoDetConfig

FORMAT = "compressed_perception/checkpoint@1"


def save_checkpoint(model: NanoDet, path: Path) -> None:
    """Weights are stored as float16 when that loses nothing (e.g. imported fp16 weights).

    Each convolution's channel counts are stored too, so that a structurally pruned
    model, whose layers no longer match its config, loads back as it was saved.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if all(torch.equal(v.half().float(), v.float()) for v in state.values()):
        state = {k: v.half() for k, v in state.items()}
    channels = {
        name: [m.in_channels, m.out_channels]
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    payload = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "channels": channels,
        "state_dict": state,
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> NanoDet:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: checkpoint not found") from exc
    except Exception as exc:  # torch raises bare RuntimeError/UnpicklingError on corrupt files
        raise ModelError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path}: not a {FORMAT} checkpoint")
    model = NanoDet(NanoDetConfig.from_dict(payload["config"]))
    _resize_convolutions(model, payload.get("channels", {}), path)
    state = {k: v.float() for k, v in payload["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit the architecture ({exc})") from exc
    return model.eval()


def _resize_convolutions(model: NanoDet, channels: dict[str, list[int]], path: Path) -> None:
    """Give each convolution the channel counts it was saved with (pruning changes them)."""
    modules = dict(model.named_modules())
    for name, (cin, cout) in channels.items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise ModelError(f"{path}: checkpoint names a convolution {name!r} the model lacks")
        if (conv.in_channels, conv.out_channels) == (cin, cout):
            continue
        resized = nn.Conv2d(
            cin, cout, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
        )
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, resized)
