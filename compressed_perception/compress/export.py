"""ONNX export under the model I/O contract, checked against PyTorch before it is kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from compressed_perception import quiet
from compressed_perception.atomic import atomic_path
from compressed_perception.errors import ModelError
from compressed_perception.models.nanodet import DeployModel, NanoDet
from compressed_perception.runtime.manifest import TensorSpec

OPSET = 18
MAX_BATCH = 16
BOX_TOLERANCE_PX = 0.05
SCORE_TOLERANCE = 1e-4


def export_onnx(model: NanoDet, dest: Path, *, dynamic_batch: bool = False) -> TensorSpec:
    """Export `model` wrapped in `DeployModel` to `dest`; returns the I/O spec it has."""
    deploy = DeployModel(model).eval()
    height, width = model.config.input_size
    spec = TensorSpec(height=height, width=width, batch=None if dynamic_batch else 1)
    example = torch.randint(
        0, 256, (2 if dynamic_batch else 1, height, width, 3), dtype=torch.uint8
    )
    shapes = (
        {"images": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}} if dynamic_batch else None
    )
    with atomic_path(Path(dest)) as tmp, quiet.torch_export():
        program = torch.onnx.export(
            deploy,
            (example,),
            input_names=[spec.input_name],
            output_names=[spec.boxes_name, spec.scores_name],
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes=shapes,
        )
        program.save(str(tmp), external_data=False)
        verify_onnx(deploy, tmp, example)
    return spec


def verify_onnx(deploy: DeployModel, path: Path, images: torch.Tensor) -> None:
    """Refuse an export whose outputs differ from the PyTorch module's."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        ref_boxes, ref_scores = (t.numpy() for t in deploy(images))
    box_err = float(np.abs(boxes - ref_boxes).max())
    score_err = float(np.abs(scores - ref_scores).max())
    if box_err > BOX_TOLERANCE_PX or score_err > SCORE_TOLERANCE:
        raise ModelError(
            f"{path}: exported ONNX differs from PyTorch (boxes {box_err:.3g} px, "
            f"scores {score_err:.3g}); not kept"
        )
