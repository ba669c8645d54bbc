"""ONNX Runtime on the CPU, with outputs written into preallocated arrays."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from compressed_perception.errors import BackendError
from compressed_perception.runtime.manifest import Manifest


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, threads: int = 0) -> None:
        path = manifest.artifact("onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors on bad models
            raise BackendError(f"{path}: ONNX Runtime cannot load the model ({exc})") from exc
        self._io = manifest.io
        # what the model scores, not what the manifest lists: the detector compares the two
        scores = next(
            (o.shape for o in self._session.get_outputs() if o.name == self._io.scores_name), None
        )
        classes = scores[-1] if scores else None
        self._num_classes = classes if isinstance(classes, int) else len(manifest.classes)
        self._binding = self._session.io_binding()
        self._outputs: tuple[np.ndarray, np.ndarray] | None = None

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = images.shape[0]
        if self._io.batch is not None and batch != self._io.batch:
            raise BackendError(f"model takes batch {self._io.batch}, got {batch} images")
        if self._outputs is None or self._outputs[0].shape[0] != batch:
            self._outputs = self._bind_outputs(batch)
        self._binding.bind_cpu_input(self._io.input_name, np.ascontiguousarray(images))
        self._session.run_with_iobinding(self._binding)
        return self._outputs

    def _bind_outputs(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Output arrays allocated once per batch size and written in place by every run."""
        cells = self._cells()
        boxes = np.empty((batch, cells, 4), np.float32)
        scores = np.empty((batch, cells, self._num_classes), np.float32)
        for name, array in ((self._io.boxes_name, boxes), (self._io.scores_name, scores)):
            self._binding.bind_output(name, "cpu", 0, np.float32, array.shape, array.ctypes.data)
        return boxes, scores

    def _cells(self) -> int:
        dims = next(o.shape for o in self._session.get_outputs() if o.name == self._io.boxes_name)
        if not isinstance(dims[1], int):
            raise BackendError(f"output {self._io.boxes_name!r} has no static cell count: {dims}")
        return dims[1]
