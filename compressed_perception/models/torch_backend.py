"""PyTorch FP32 reference backend: the same I/O contract, run by the nn.Module itself."""

from __future__ import annotations

import numpy as np
import torch

from compressed_perception.models.checkpoint import load_checkpoint
from compressed_perception.models.nanodet import DeployModel
from compressed_perception.runtime.manifest import Manifest


class TorchBackend:
    name = "torch"

    def __init__(self, manifest: Manifest, threads: int = 0) -> None:
        if threads:
            torch.set_num_threads(threads)
        self._model = DeployModel(load_checkpoint(manifest.artifact("torch"))).eval()

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            boxes, scores = self._model(torch.from_numpy(np.ascontiguousarray(images)))
        return boxes.numpy(), scores.numpy()
