"""Core ML (extra ``[coreml]``): a deploy form as ML Program packages, ``model.mlpackage`` (fp32) and ``model_fp16.mlpackage``.

Converted by ``coremltools`` from a ``torch.export`` program (``run_decompositions({})`` first, as
coremltools asks), at the model's own input size and batch 1. coremltools is imported only inside
these functions, so importing :mod:`repblocks.deploy` never loads it.

Core ML runs on Apple systems only: on Linux nothing can run a package, so an export is checked
by validating what was written instead (:func:`validate`): read back without loading it, its
input and output names and shapes, the deploy metadata, the precision of every weight, and as
many convolutions in its program as the model has ``nn.Conv2d``.

What an iOS app gets is what Core ML's own APIs (and Vision's ``VNCoreMLRequest``) expect of an image
classifier:

* input ``image``: a ``ct.ImageType``, RGB (grayscale for one channel) at the model's input size, its
  pixels 0-255 (a ``CVPixelBuffer``). Core ML multiplies it by 1/255 (the image type's scale); the
  per-channel normalization ``(x - mean) / std`` is the package's first two ops (:class:`Classifier`),
  exact: an image type takes one scale for all channels and a bias per channel, which cannot express
  ImageNet's per-channel standard deviations (0.229, 0.224, 0.225) exactly. It does not resize or
  crop: the app (or Vision's ``imageCropAndScaleOption``) gives the input size, as ``crop_pct`` says.
  A model of another channel count, or whose metadata gives no ``mean``/``std``, takes the float32
  tensor ``images`` ``(1, C, H, W)`` normalized by the caller, like every other export;
* outputs: a classifier's (``ct.ClassifierConfig``): ``classLabel``, the predicted class name (its
  index without class names), and ``classLabel_probs``, the softmax probability of each class name;
* the description (``short_description``, author, the input's and outputs' descriptions), and the
  deploy metadata (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``, class names)
  with what the input is (``input_type``, ``input_shape``, ``normalization``) in the package's
  ``user_defined_metadata``, as strings (JSON for lists).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from repblocks.deploy.engines.base import Engine
from repblocks.errors import OutputMismatch, UserError
from repblocks.files import atomic_path

__all__ = [
    "ENGINE",
    "IMAGE_INPUT",
    "INPUT_NAME",
    "LABEL_OUTPUT",
    "PROBABILITIES_OUTPUT",
    "Classifier",
    "INSTALL",
    "OUTPUT_NAME",
    "PRECISIONS",
    "export",
    "missing",
    "read_metadata",
    "validate",
]

INSTALL = "pip install 'repblocks[coreml]'"
INPUT_NAME, OUTPUT_NAME = "images", "logits"  # the ONNX export's names (the tensor input: INPUT_NAME)
IMAGE_INPUT = "image"  # the image input's name
LABEL_OUTPUT, PROBABILITIES_OUTPUT = "classLabel", "classLabel_probs"  # a Core ML classifier's outputs
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


class Classifier(nn.Module):
    """``model`` as Core ML's image classifier runs it: pixels 0-1 normalized per channel inside, probabilities out."""

    def __init__(self, model: nn.Module, mean: list[float] | None = None, std: list[float] | None = None) -> None:
        super().__init__()
        self.model = model
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("inv_std", 1 / torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        if self.normalize:
            images = (images - self.mean) * self.inv_std  # (B, C, H, W)
        return torch.softmax(self.model(images), dim=-1)  # (B, classes)


def export(model: nn.Module, path: str | os.PathLike, example: Tensor, *, precision: str, metadata: Mapping[str, str]):
    """Convert ``model`` to an ML Program classifier in ``precision`` and save it as the package ``path`` (a folder).

    ``path`` should be a temporary name: the caller renames it once :func:`validate` passed.
    """
    ct = _coremltools()

    example = example[:1]  # (1, C, H, W): a phone's batch
    num_classes = model(example).shape[-1]
    image = _image_input(metadata, channels=example.shape[1])
    if image is None:
        network, inputs = Classifier(model), [ct.TensorType(name=INPUT_NAME, shape=tuple(example.shape))]
    else:
        network = Classifier(model, *image)
        colour = ct.colorlayout.RGB if example.shape[1] == 3 else ct.colorlayout.GRAYSCALE
        inputs = [ct.ImageType(name=IMAGE_INPUT, shape=tuple(example.shape), scale=1 / 255, color_layout=colour)]
    program = torch.export.export(network.eval(), (example,)).run_decompositions({})
    with _quiet():
        package = ct.convert(
            program,
            inputs=inputs,
            classifier_config=ct.ClassifierConfig(class_labels(metadata, num_classes)),
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        )
    takes = input_metadata(metadata, tuple(example.shape))
    package.short_description = (
        f"{metadata.get('model', 'An image')} classifier, {num_classes} classes. Input: {takes['input_type']} "
        f"{'x'.join(map(str, example.shape[2:]))}; normalization {takes['normalization']}."
    )
    package.author = "repblocks"
    package.input_description[inputs[0].name] = f"{takes['input_type']}, normalization {takes['normalization']}"
    package.output_description[LABEL_OUTPUT] = "The most probable class"
    package.output_description[PROBABILITIES_OUTPUT] = "The probability of each class"
    package.user_defined_metadata.update({**metadata, "precision": precision, **takes})
    package.save(str(path))
    if getattr(package, "is_temp_package", False):  # the converter's own copy in the temp folder: gone now, not at
        shutil.rmtree(package.package_path, ignore_errors=True)  # exit (a killed process would leave it behind)


def _image_input(metadata: Mapping[str, str], *, channels: int) -> tuple[list[float], list[float]] | None:
    """The mean and std of an image input, or None where the input stays a tensor (see the module's docstring)."""
    if channels not in (1, 3) or "mean" not in metadata or "std" not in metadata:
        return None
    mean, std = json.loads(metadata["mean"]), json.loads(metadata["std"])
    return (mean, std) if len(mean) == len(std) == channels else None


def input_metadata(metadata: Mapping[str, str], shape: tuple[int, ...]) -> dict[str, str]:
    """What the package's input is, for its metadata: ``input_type``, ``input_shape``, ``normalization``."""
    if _image_input(metadata, channels=shape[1]) is None:
        return {
            "input_type": "float32 NCHW tensor",
            "input_shape": json.dumps(list(shape)),
            "normalization": "by the caller",
        }
    colour = "RGB" if shape[1] == 3 else "grayscale"
    return {
        "input_type": f"{colour} image, pixels 0-255",
        "input_shape": json.dumps(list(shape)),
        "normalization": "inside the model: (pixel / 255 - mean) / std",
    }


def class_labels(metadata: Mapping[str, str], num_classes: int) -> list:
    """The classifier's labels: the class names when the metadata has one per class, else the indices."""
    names = json.loads(metadata.get("class_names", "[]"))
    return [str(name) for name in names] if len(names) == num_classes else list(range(num_classes))


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
    found = {item.name: _shape(item) for item in [*spec.description.input, *spec.description.output]}
    image = _image_input(metadata, channels=input_shape[0]) is not None
    expected = {
        IMAGE_INPUT if image else INPUT_NAME: ("image" if image else "tensor", (1, *input_shape)),
        LABEL_OUTPUT: ("label", ()),
        PROBABILITIES_OUTPUT: ("probabilities", ()),
    }
    if found != expected:
        raise OutputMismatch(f"the Core ML package has inputs and outputs {found}, not {expected}")
    labels = read_labels(path)
    if labels != class_labels(metadata, num_classes):
        raise OutputMismatch(
            f"the Core ML classifier has {len(labels)} class labels; the model has {num_classes} classes"
        )
    stored = read_metadata(path)
    differ = sorted(key for key, value in metadata.items() if stored.get(key) != value)
    if differ:
        raise OutputMismatch(f"the Core ML package's metadata lost or changed {', '.join(differ)}")
    if not spec.HasField("mlProgram"):
        raise OutputMismatch("the Core ML package is not an ML Program")
    function = spec.mlProgram.functions["main"]
    operations = function.block_specializations[function.opset].operations
    weight_types = {
        MIL_pb2.DataType.Name(op.attributes["val"].type.tensorType.dataType)
        for op in operations
        if op.type == "const"
        and op.attributes["val"].type.tensorType.dataType in _FLOAT_TYPES
        # a tensor, not a scalar: the image input's scale (1/255) is float32 in either precision, applied before the cast
        and op.attributes["val"].type.tensorType.rank > 0
    }
    wanted = "FLOAT16" if precision == "fp16" else "FLOAT32"
    if weight_types != {wanted}:
        raise OutputMismatch(
            f"the {precision} Core ML package holds weights of {sorted(weight_types)}, not {wanted} only"
        )
    found = sum(op.type == "conv" for op in operations)
    if found != convs:
        raise OutputMismatch(f"the Core ML program has {found} convolutions; the model has {convs}")
    return (
        f"spec validated, {NOT_RUN}: {found} conv ops, {wanted.lower()} weights, {len(labels)} class labels, metadata"
    )


def _shape(feature) -> tuple[str, tuple[int, ...]]:
    """What a feature of the spec's description is: ("image", (1, C, H, W)), ("tensor", shape), or a classifier's."""
    kind = feature.type.WhichOneof("Type")
    if kind == "imageType":
        image = feature.type.imageType
        channels = 1 if image.colorSpace == image.GRAYSCALE else 3
        return "image", (1, channels, image.height, image.width)
    if kind == "multiArrayType":
        return "tensor", tuple(feature.type.multiArrayType.shape)
    return ("probabilities" if kind == "dictionaryType" else "label"), ()


def read_labels(path: str | os.PathLike) -> list:
    """The class labels of the package's classifier, as its ``classify`` op holds them (strings or indices)."""
    spec = _spec(Path(path))
    function = spec.mlProgram.functions["main"]
    for op in function.block_specializations[function.opset].operations:
        if op.type == "classify":
            tensor = op.inputs["classes"].arguments[0].value.immediateValue.list
            return [_label(value) for value in tensor.values]
    return []


def _label(value) -> str | int:
    tensor = value.immediateValue.tensor
    return tensor.strings.values[0] if tensor.WhichOneof("value") == "strings" else int(tensor.longInts.values[0])


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
