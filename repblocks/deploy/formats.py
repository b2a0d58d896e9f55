"""The names a deploy run is configured with: export formats and their files, backends, dtypes.

Kept apart from the modules that do the work (:mod:`~repblocks.deploy.export`,
:mod:`~repblocks.deploy.engines`, :mod:`~repblocks.deploy.openvino`), so that checking a
:class:`~repblocks.deploy.config.DeployConfig` loads no inference engine, and so that those
modules share these names without importing each other.
"""

from __future__ import annotations

import importlib.util

__all__ = [
    "BACKENDS",
    "COREML_FP16_FILE",
    "DEFAULT_BACKENDS",
    "DEFAULT_EXPORTS",
    "DTYPE_NAMES",
    "EXPORT_FORMATS",
    "FILE_NAMES",
    "INT8_FILE_NAMES",
    "MIN_ONNX_OPSET",
    "OPT_IN_EXPORTS",
    "openvino_installed",
]

EXPORT_FORMATS = ("safetensors", "onnx", "torch_export", "openvino", "executorch", "litert", "coreml")
FILE_NAMES = {
    "safetensors": "model.safetensors",
    "onnx": "model.onnx",
    "torch_export": "model.pt2",
    "openvino": "model.xml",  # and model.bin beside it
    "executorch": "model.pte",  # XNNPACK, fp32
    "litert": "model.tflite",
    "coreml": "model.mlpackage",  # a folder; fp32, and COREML_FP16_FILE beside it
}
COREML_FP16_FILE = "model_fp16.mlpackage"
INT8_FILE_NAMES = {
    "openvino": "model_int8.xml",  # model_int8.bin beside it
    "onnxruntime": "model_int8.onnx",
    "executorch": "model_int8.pte",
    "litert": "model_int8.tflite",
}
# The phone and edge formats are asked for by name (export.formats=[...,executorch]): each converts for its own
# device, which most runs do not target, and each conversion takes seconds to minutes.
OPT_IN_EXPORTS = ("executorch", "litert", "coreml")
MIN_ONNX_OPSET = 18  # the torch.export-based exporter's lowest; asked for less, it writes 18 and says so in a log

DTYPE_NAMES = ("fp32", "fp16", "bf16")
BACKENDS = (
    "eager",
    "channels_last",
    "compile",
    "onnxruntime",
    "openvino",
    "openvino_throughput",
    "tensorrt",
    "onnxruntime_trt",
    "executorch",
    "litert",
)
# compile is opt-in (minutes to build on a small CPU), and so are executorch and litert (a conversion per model
# form: tens of seconds to two minutes for RepVGG-A0 on 2 cores); the engines of the other device are listed as skipped.
OPT_IN_BACKENDS = ("compile", "executorch", "litert")
DEFAULT_BACKENDS = tuple(b for b in BACKENDS if b not in OPT_IN_BACKENDS)


def openvino_installed() -> bool:
    """Whether OpenVINO and NNCF can be imported, without importing them (what defaults are chosen by)."""
    try:
        return all(importlib.util.find_spec(package) is not None for package in ("openvino", "nncf"))
    except ImportError:  # an import hook that refuses the name
        return False


DEFAULT_EXPORTS = tuple(
    f for f in EXPORT_FORMATS if f not in OPT_IN_EXPORTS and (f != "openvino" or openvino_installed())
)
