"""The engines deploy.py writes, checks, times and predict.py runs: one module each, listed once in :data:`ENGINES`.

Each module under this package implements :class:`~repblocks.deploy.engines.base.Engine`; the table
below says, for each, what deploy.py's settings call it (its export format, its timing backends,
whether it quantizes, which reduced float precisions it gates like int8), which file it writes per
precision, what ``predict.py`` recognises it by, and which of those are asked for by name only (opt-in). The stages loop over the table: adding an engine
is one module and one line here.

The table imports no engine: :func:`engine` imports a module when it is used, so that checking a
:class:`~repblocks.deploy.config.DeployConfig` loads no inference engine and no engine module
imports the registry back.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the protocol's own module, which imports nothing of this one
    from repblocks.deploy.engines.base import Engine

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKENDS",
    "DEFAULT_EXPORTS",
    "DTYPE_NAMES",
    "ENGINES",
    "EXPORT_FORMATS",
    "FLOAT_PRECISIONS",
    "MIN_ONNX_OPSET",
    "QUANT_ENGINES",
    "Entry",
    "by_backend",
    "by_format",
    "by_name",
    "by_suffix",
    "engine",
    "installed",
]


@dataclass(frozen=True)
class Entry:
    """One engine as deploy.py's settings and predict.py name it."""

    name: str  # its module under repblocks.deploy.engines, and its name in quantize.engines
    format: str | None  # its name in export.formats; None: it writes no file of its own
    files: dict[str, str] = field(default_factory=dict)  # precision -> file name; "int8": it quantizes
    floats: tuple[str, ...] = ()  # reduced float precisions gated like int8 (a file in files, written if it passes)
    opt_in: bool = False  # its export is written only when export.formats names it
    backends: tuple[str, ...] = ()  # its names in bench.backends
    opt_in_backends: tuple[str, ...] = ()  # those timed only when bench.backends names them
    suffix: str | None = None  # predict.py runs (or refuses, saying why) files ending so

    @property
    def file(self) -> str | None:
        """The float32 file (Core ML's and OpenVINO's are a folder or a pair: ``model.xml`` + ``model.bin``)."""
        return self.files.get("fp32")

    @property
    def quantizes(self) -> bool:
        return "int8" in self.files

    @property
    def export_precisions(self) -> tuple[str, ...]:
        """The float precisions its export writes, ungated, each to its own file: fp32, and Core ML's fp16."""
        return tuple(p for p in self.files if p != "int8" and p not in self.floats)

    def load(self) -> Engine:
        return engine(self.name)


# Timed by name only: torch.compile (minutes to build on a small CPU); ExecuTorch, LiteRT and AOTInductor (a
# conversion or a C++ build per model form: tens of seconds to minutes for RepVGG-A0 on 2 cores). Exported by
# name only: the phone and edge formats (each converts for its own device, which most runs do not target).
# fmt: off
ENGINES = (
    Entry("pytorch", "safetensors", {"fp32": "model.safetensors"}, backends=("eager", "channels_last", "compile"),
          opt_in_backends=("compile",), suffix=".safetensors"),
    Entry("onnxruntime", "onnx", {"fp32": "model.onnx", "int8": "model_int8.onnx"},
          backends=("onnxruntime", "onnxruntime_trt"), suffix=".onnx"),
    Entry("torch_export", "torch_export", {"fp32": "model.pt2"}, suffix=".pt2"),
    Entry("openvino", "openvino", {"fp32": "model.xml", "int8": "model_int8.xml", "bf16": "model_bf16.xml",
          "fp16": "model_fp16.xml"}, floats=("bf16", "fp16"), backends=("openvino", "openvino_throughput"),
          suffix=".xml"),
    Entry("tensorrt", None, backends=("tensorrt",)),
    Entry("executorch", "executorch", {"fp32": "model.pte", "int8": "model_int8.pte"}, opt_in=True,
          backends=("executorch",), opt_in_backends=("executorch",), suffix=".pte"),
    Entry("litert", "litert", {"fp32": "model.tflite", "int8": "model_int8.tflite"}, opt_in=True,
          backends=("litert",), opt_in_backends=("litert",), suffix=".tflite"),
    Entry("coreml", "coreml", {"fp32": "model.mlpackage", "fp16": "model_fp16.mlpackage"}, opt_in=True,
          suffix=".mlpackage"),
    Entry("aoti", "aoti", {"fp32": "model.aoti.pt2"}, opt_in=True, backends=("aoti",), opt_in_backends=("aoti",),
          suffix=".aoti.pt2"),
)
# fmt: on

MIN_ONNX_OPSET = 18  # the torch.export-based exporter's lowest; asked for less, it writes 18 and says so in a log
DTYPE_NAMES = ("fp32", "fp16", "bf16")
EXPORT_FORMATS = tuple(e.format for e in ENGINES if e.format)
BACKENDS = tuple(backend for e in ENGINES for backend in e.backends)
DEFAULT_BACKENDS = tuple(backend for e in ENGINES for backend in e.backends if backend not in e.opt_in_backends)
QUANT_ENGINES = tuple(e.name for e in ENGINES if e.quantizes)
# Reduced float precisions an engine runs and the int8 gate judges (quantize.floats): OpenVINO's bf16 and fp16.
FLOAT_PRECISIONS = tuple(dict.fromkeys(p for e in ENGINES for p in e.floats))


def installed(*packages: str) -> bool:
    """Whether ``packages`` can all be imported, without importing them (what defaults are chosen by)."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(package) is not None for package in packages)
    except (ImportError, ValueError):  # an import hook that refuses the name
        return False


# OpenVINO's export is a default only where OpenVINO and NNCF are installed: the others' engines are [deploy]'s.
DEFAULT_EXPORTS = tuple(
    e.format for e in ENGINES if e.format and not e.opt_in and (e.name != "openvino" or installed("openvino", "nncf"))
)


def engine(name: str) -> Engine:
    """The engine registered as ``name`` (its module imported now)."""
    if name not in {e.name for e in ENGINES}:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(e.name for e in ENGINES)}")
    return importlib.import_module(f"{__name__}.{name}").ENGINE


def by_format(fmt: str) -> Entry:
    return _one(fmt, "export format", lambda e: e.format == fmt)


def by_backend(backend: str) -> Entry:
    return _one(backend, "backend", lambda e: backend in e.backends)


def by_name(name: str) -> Entry:
    return _one(name, "engine", lambda e: e.name == name)


def by_suffix(file_name: str) -> Entry | None:
    """The entry whose suffix ends ``file_name`` (the longest, so ``.aoti.pt2`` before ``.pt2``); None when none does."""
    name = file_name.lower()
    matches = [e for e in ENGINES if e.suffix and name.endswith(e.suffix)]
    return max(matches, key=lambda e: len(e.suffix), default=None)


def _one(value: str, what: str, predicate) -> Entry:
    for entry in ENGINES:
        if predicate(entry):
            return entry
    raise ValueError(f"unknown {what} {value!r}")
