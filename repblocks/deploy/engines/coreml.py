"""Core ML (extra ``[coreml]``): a deploy form as ML Program packages, ``model.mlpackage`` (fp32) and ``model_fp16.mlpackage``.

Converted by ``coremltools`` from a ``torch.export`` program (``run_decompositions({})`` first, as
coremltools asks), at the model's own input size and batch 1. coremltools is imported only inside
these functions, so importing :mod:`repblocks.deploy` never loads it.

Core ML runs on Apple systems only: on Linux nothing can run a package, so an export is checked
by validating what was written instead (:func:`validate`): read back without loading it, its
input and output names and shapes, the deploy metadata, the precision of every weight, and as
many convolutions in its program as the model has ``nn.Conv2d``.

The input is a float32 tensor ``images`` of ``(1, C, H, W)``, normalized as the metadata says, like
every other export, not a ``ct.ImageType``: an image input takes one scale for all channels, so
ImageNet's per-channel standard deviations cannot be expressed exactly, and it would not resize or
crop either. The preprocessing (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``)
and the class names travel in the package's ``user_defined_metadata``, as JSON strings.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from torch import Tensor, nn

from repblocks.deploy.engines.base import Engine
from repblocks.errors import UserError
from repblocks.files import atomic_path

__all__ = [
    "ENGINE",
    "INPUT_NAME",
    "INSTALL",
    "OUTPUT_NAME",
    "PRECISIONS",
    "export",
    "missing",
    "read_metadata",
    "validate",
]

INSTALL = "pip install 'repblocks[coreml]'"
INPUT_NAME, OUTPUT_NAME = "images", "logits"  # the ONNX export's names
PRECISIONS = ("fp32", "fp16")
NOT_RUN = "not run here (Core ML runs on macOS)"
# What coremltools logs on every import on Linux and with our pinned packages, none of it about our models.
_NOISE = (
    "Failed to load _ML",  # its macOS runtime library, absent on Linux
    "has not been tested with coremltools",  # torch newer than it was tested with
    "scikit-learn version",  # its sklearn converters, which we do not use
)


def missing() -> str | None:
    """Why coremltools cannot be used here (not installed), or None when it can; imports nothing."""
    import importlib.util

    try:
        found = importlib.util.find_spec("coremltools") is not None
    except ImportError:  # an import hook that refuses the name
        found = False
    return None if found else f"coremltools is not installed ({INSTALL})"


def require(setting: str) -> None:
    """:class:`UserError` naming ``setting`` when coremltools is not installed."""
    reason = missing()
    if reason:
        raise UserError(f"{setting} needs coremltools, but {reason}")


def export(model: nn.Module, path: str | os.PathLike, example: Tensor, *, precision: str, metadata: Mapping[str, str]):
    """Convert ``model`` to an ML Program in ``precision`` and save it as the package ``path`` (a folder).

    ``path`` should be a temporary name: the caller renames it once :func:`validate` passed.
    """
    ct = _coremltools()
    import torch

    example = example[:1]  # (1, C, H, W): a phone's batch
    program = torch.export.export(model.eval(), (example,)).run_decompositions({})
    with _quiet():
        package = ct.convert(
            program,
            inputs=[ct.TensorType(name=INPUT_NAME, shape=tuple(example.shape))],
            outputs=[ct.TensorType(name=OUTPUT_NAME)],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        )
    package.user_defined_metadata.update({**metadata, "precision": precision})
    package.save(str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The deploy metadata of an ``.mlpackage`` (coremltools' own ``com.github.apple.*`` entries left out).

    Raises:
        ValueError: ``path`` is not a Core ML package coremltools can read; one line.
    """
    spec = _spec(Path(path))
    return {k: v for k, v in spec.description.metadata.userDefined.items() if not k.startswith("com.github.apple.")}


def validate(path: str | os.PathLike, *, input_shape: tuple[int, ...], num_classes: int, convs: int, precision: str,
             metadata: Mapping[str, str]) -> str:  # fmt: skip
    """Check the package at ``path`` without running it; return what was checked, for the report.

    Raises:
        ValueError: Its inputs, outputs, metadata, weight precision or number of convolutions are not the model's.
    """
    from coremltools.proto import MIL_pb2

    path = Path(path)
    spec = _spec(path)
    (source,), (target,) = spec.description.input, spec.description.output
    shapes = {
        source.name: tuple(source.type.multiArrayType.shape),
        target.name: tuple(target.type.multiArrayType.shape),
    }
    expected = {INPUT_NAME: (1, *input_shape), OUTPUT_NAME: (1, num_classes)}
    if shapes != expected:
        raise ValueError(f"the Core ML package has inputs and outputs {shapes}, not {expected}")
    stored = read_metadata(path)
    differ = sorted(key for key, value in metadata.items() if stored.get(key) != value)
    if differ:
        raise ValueError(f"the Core ML package's metadata lost or changed {', '.join(differ)}")
    if not spec.HasField("mlProgram"):
        raise ValueError("the Core ML package is not an ML Program")
    function = spec.mlProgram.functions["main"]
    operations = function.block_specializations[function.opset].operations
    weight_types = {
        MIL_pb2.DataType.Name(op.attributes["val"].type.tensorType.dataType)
        for op in operations
        if op.type == "const" and op.attributes["val"].type.tensorType.dataType in _FLOAT_TYPES
    }
    wanted = "FLOAT16" if precision == "fp16" else "FLOAT32"
    if weight_types != {wanted}:
        raise ValueError(f"the {precision} Core ML package holds weights of {sorted(weight_types)}, not {wanted} only")
    found = sum(op.type == "conv" for op in operations)
    if found != convs:
        raise ValueError(f"the Core ML program has {found} convolutions; the model has {convs}")
    return f"spec validated, {NOT_RUN}: {found} conv ops, {wanted.lower()} weights, metadata"


_FLOAT_TYPES = (10, 11)  # MIL_pb2.DataType FLOAT16, FLOAT32 (the proto's numbers, without importing it here)


def version() -> str:
    """``"coremltools 9.0"``: what wrote a package, for the report."""
    from importlib.metadata import version as installed

    return f"coremltools {installed('coremltools')}"


def _spec(path: Path):
    if not (path / "Manifest.json").is_file():
        raise ValueError(f"{path} is not a Core ML package (a folder with a Manifest.json)")
    ct = _coremltools()
    try:
        with _quiet():
            return ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    except Exception as err:  # coremltools' own errors, from protobuf and its package reader
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(f"coremltools cannot read {path}: {lines[0] if lines else type(err).__name__}") from None


def _coremltools():
    """The ``coremltools`` module, imported with its import-time noise filtered out of the log."""
    require("the Core ML export")
    logger = logging.getLogger("coremltools")
    if not any(isinstance(f, _NoiseFilter) for f in logger.filters):
        logger.addFilter(_NoiseFilter())
    if logger.level == logging.NOTSET:  # unless the user chose: its info lines name every op each pass removes
        logger.setLevel(logging.WARNING)
    import coremltools

    return coremltools


class _NoiseFilter(logging.Filter):
    """Drops coremltools' warnings about packages and runtimes we do not use (:data:`_NOISE`), keeps the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Inside, coremltools' progress bars (tqdm, on stderr) and its warnings about its own deprecated names
    (one per op converted) go nowhere; its log records still reach the log."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"coremltools\.")
        yield


class CoreML(Engine):
    name = "coreml"
    title = "coremltools"
    refused = "Core ML runs on macOS only"

    def missing(self, device=None):
        return missing()

    def export(self, model, path, example, metadata, *, check, precision="fp32"):
        """The package in ``precision`` (fp32 or fp16), its spec validated: Core ML cannot run on Linux."""
        path = Path(path)
        with atomic_path(path, folder=True) as tmp:
            export(model, tmp, example, precision=precision, metadata=metadata)
            checked = validate(
                tmp,
                input_shape=tuple(example.shape[1:]),
                num_classes=model(example[:1]).shape[-1],
                convs=sum(isinstance(module, nn.Conv2d) for module in model.modules()),
                precision=precision,
                metadata=metadata,
            )
        return {"path": str(path), "format": f"coreml {precision}", "runtime": version(), "check": checked}

    def read_metadata(self, path):
        return read_metadata(path)


ENGINE = CoreML()
