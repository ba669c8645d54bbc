"""The build's stages, in the order they run: adding a stage is one line here."""

from __future__ import annotations

from compressed_perception.compress import (
    distill,
    fit_input,
    prune,
    quantize,
    quantize_openvino,
    reconstruct,
    tensorrt,
)
from compressed_perception.compress.stage import Stage

STAGES: tuple[Stage, ...] = (
    fit_input.STAGE,
    prune.STAGE,
    reconstruct.STAGE,
    distill.STAGE,
    quantize.ORT_STAGE,
    quantize_openvino.STAGE,
    quantize.QDQ_STAGE,
    tensorrt.STAGE,
)
