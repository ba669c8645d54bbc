"""OpenVINO on x86 and ARM CPUs: the runtime whose INT8 kernels use VNNI and AMX.

Runs the contract's ONNX directly or an OpenVINO IR (`.xml` plus its `.bin`, both checked
against the manifest). The inference precision is explicit: OpenVINO would otherwise run an
FP32 model in bf16 on a CPU that has bf16 units, and its scores would move. bf16 is used
only where the manifest records it as the artifact's chosen precision. Compiled models are
cached on disk, so a node restart does not compile again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints

from compressed_perception.errors import BackendError
from compressed_perception.runtime.manifest import Manifest

PRECISIONS = {"f32": ov.Type.f32, "bf16": ov.Type.bf16}
DEFAULT_PRECISION = "f32"


def cache_dir() -> Path:
    """Where compiled models are kept: $COMPRESSED_PERCEPTION_OPENVINO_CACHE, else the
    user's cache folder."""
    override = os.environ.get("COMPRESSED_PERCEPTION_OPENVINO_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compressed_perception" / "openvino"


def inference_precision(manifest: Manifest) -> str:
    """The precision recorded for this artifact (`build.openvino.inference_precision`)."""
    chosen = manifest.build.get("openvino", {}).get("inference_precision", DEFAULT_PRECISION)
    if chosen not in PRECISIONS:
        raise BackendError(
            f"{manifest.path}: OpenVINO inference precision {chosen!r} is not one of "
            f"{', '.join(PRECISIONS)}"
        )
    return str(chosen)


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, manifest: Manifest, threads: int = 0) -> None:
        kind = "openvino" if "openvino" in manifest.artifacts else "onnx"
        path = manifest.artifact(kind)  # an IR's .bin is verified with it
        self.precision = inference_precision(manifest)
        config: dict[str, Any] = {
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            hints.inference_precision: PRECISIONS[self.precision],
        }
        if threads:
            config[props.inference_num_threads] = threads
        folder = cache_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            config[props.cache_dir] = str(folder)
        except OSError:
            pass  # a read-only home still runs, it only compiles at every start
        core = ov.Core()
        try:
            model = core.read_model(str(path))
            self._compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:  # OpenVINO raises RuntimeError for bad or partial files
            raise BackendError(f"{path}: OpenVINO cannot load the model ({exc})") from exc
        self._io = manifest.io
        self._request = self._compiled.create_infer_request()
        self._boxes = self._compiled.output(self._io.boxes_name)
        self._scores = self._compiled.output(self._io.scores_name)

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = images.shape[0]
        if self._io.batch is not None and batch != self._io.batch:
            raise BackendError(f"model takes batch {self._io.batch}, got {batch} images")
        self._request.infer({self._io.input_name: np.ascontiguousarray(images)})
        return (
            self._request.get_tensor(self._boxes).data,
            self._request.get_tensor(self._scores).data,
        )
