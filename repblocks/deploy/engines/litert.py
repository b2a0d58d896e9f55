"""LiteRT (extra ``[litert]``, formerly TensorFlow Lite): a deploy form as ``model.tflite``, run by LiteRT's interpreter.

The converter is ``litert_torch`` (``litert_torch.convert(model, (example,))``), which lowers a
``torch.export`` program; the runtime is ``ai_edge_litert``'s interpreter (XNNPACK on the CPU).
Both are imported only inside these functions, so importing :mod:`repblocks.deploy` never loads
them (nor the JAX and TensorFlow pieces they pull in).

What a phone app gets: the file takes float32 images, **NHWC** by default (``export.layout``: what
Android's Bitmap and LiteRT's and MediaPipe's image helpers hand over; ``nchw``, the model's own, on
request), at the model's own input size and a **fixed batch of 1**: the batch size a phone runs,
and the only one the converter's static shapes promise. A larger batch is run image by image
(:func:`load`, which takes NCHW like every engine's runner and transposes for an NHWC file). The
int8 file has float32 input and output too (quantized inside, a QUANTIZE and a DEQUANTIZE op at
the edges: :func:`float_io`), so an app never applies a scale and zero point itself.

Two metadata entries are written into the flatbuffer's ``metadata`` list (:func:`with_metadata`):

* :data:`METADATA_NAME`: the deploy metadata (model, preprocessing, class names) and what the file
  takes (``input_layout``, ``input_dtype``, ``input_shape``, ``output_dtype``), as one JSON object
  of plain JSON values (files before it held JSON strings inside JSON; :func:`read_metadata` reads both);
* :data:`STANDARD_NAME` (``TFLITE_METADATA``): TFLite's metadata convention, the ``ModelMetadata``
  flatbuffer (``metadata_schema.fbs``, identifier ``M001``) that LiteRT's support library and
  MediaPipe's image classifier read: name, description, the input's normalization in 0-255 pixel
  units (``mean * 255``, ``std * 255`` per channel) and colour space, and, when the model names its
  classes, ``labels.txt`` (one name a line) as the output's ``TENSOR_AXIS_LABELS`` file, packed as
  that convention packs associated files: a zip archive appended to the flatbuffer. It is built
  here with ``flatbuffers`` (which ``ai_edge_litert`` needs): the ``tflite-support`` package that
  ships the schema's Python code does not import on Python 3.11 without libusb.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from repblocks.deploy.engines.base import (
    LAYOUTS,
    Engine,
    Int8Artifact,
    Runner,
    check_engine,
    check_outputs,
    io_metadata,
)
from repblocks.errors import OutputMismatch, UserError
from repblocks.files import atomic_path

__all__ = [
    "ENGINE",
    "INSTALL",
    "LABELS_FILE",
    "METADATA_NAME",
    "STANDARD_NAME",
    "convert",
    "float_io",
    "int8",
    "load",
    "missing",
    "read_metadata",
    "read_labels",
    "require",
    "version",
    "with_metadata",
]

INSTALL = "pip install 'repblocks[litert]'"
METADATA_NAME = "repblocks"  # one entry of the flatbuffer's metadata list: the deploy metadata as a JSON object
STANDARD_NAME = "TFLITE_METADATA"  # the entry TFLite's metadata convention reads: a ModelMetadata flatbuffer
LABELS_FILE = "labels.txt"  # the class names, one a line, in the zip archive appended to the file
_FORMAT_KEY, _FORMAT = "metadata_format", 2  # in our entry: values are JSON values (format 1: JSON strings)
_TEXT_KEYS = ("model", "form", "precision", "input_layout", "input_dtype", "output_dtype")  # plain text, not JSON
_PACKAGES = ("litert_torch", "ai_edge_litert")
_IDENTIFIER = b"TFL3"  # the TFLite schema's file identifier, bytes 4 to 8 of every .tflite


def missing() -> str | None:
    """Why LiteRT cannot be used here (its packages not installed), or None when it can; imports nothing."""
    import importlib.util

    for package in _PACKAGES:
        try:
            found = importlib.util.find_spec(package) is not None
        except ImportError:  # an import hook that refuses the name
            found = False
        if not found:
            return f"{package} is not installed ({INSTALL})"
    return None


def require(setting: str) -> None:
    """:class:`UserError` naming ``setting`` when LiteRT is not installed."""
    reason = missing()
    if reason:
        raise UserError(f"{setting} needs LiteRT, but {reason}")


def version() -> str:
    """``"litert-torch 0.10.0, ai-edge-litert 2.3.0"``: what wrote and what ran a file, for the report."""
    from importlib.metadata import version as installed

    return f"litert-torch {installed('litert-torch')}, ai-edge-litert {installed('ai-edge-litert')}"


def convert(model: nn.Module, example: Tensor, metadata: Mapping[str, str], *, layout: str = LAYOUTS[0]) -> bytes:
    """The ``.tflite`` flatbuffer of ``model`` for ``example``'s shape (batch 1), metadata inside if any.

    ``layout`` ``"nhwc"``: the file takes ``(1, H, W, C)`` (the converter folds the transpose into its
    own NHWC kernels: no TRANSPOSE op is left); ``"nchw"``: ``(1, C, H, W)``, as the model.
    """
    require("the LiteRT export")
    with _quiet_converter():
        import litert_torch

        example = _in_layout(example[:1], layout)
        flatbuffer = litert_torch.convert(_with_layout(model.eval(), layout), (example,)).model_content()
    return with_metadata(bytes(flatbuffer), metadata) if metadata else bytes(flatbuffer)


def _with_layout(model: nn.Module, layout: str) -> nn.Module:
    """``model`` taking images in ``layout`` (LiteRT's own wrapper, which the converter recognises)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout == "nchw":
        return model
    import litert_torch

    wrapped = litert_torch.to_channel_last_io(model, args=[0])
    wrapped.training = model.training  # the wrapper alone: the converter warns of a module left in training mode
    return wrapped


def _in_layout(images: Tensor, layout: str) -> Tensor:
    """NCHW ``images`` as a file in ``layout`` takes them."""
    return images.permute(0, 2, 3, 1).contiguous() if layout == "nhwc" else images


@dataclass(frozen=True)
class Quantized:
    """A PT2E-quantized program and the ``.tflite`` the gate judges (NCHW); :func:`int8_file` writes it in a layout."""

    program: nn.Module  # convert_pt2e's output, input (1, C, H, W)
    quantizer: object  # the PT2EQuantizer that calibrated it: the converter reads its choices
    flatbuffer: bytes  # NCHW, float32 I/O


def int8(model: nn.Module, calibration: Tensor) -> Quantized:
    """``model`` quantized to int8 by the converter's PT2E quantizer; the gate's ``.tflite`` inside (no metadata).

    Static, symmetric, per-channel weights (litert_torch's ``get_symmetric_quantization_config``),
    calibrated on ``calibration`` ``(N, C, H, W)`` an image at a time (the program has batch 1). The
    file takes float32 images and gives float32 logits (:func:`float_io`), as a phone app expects.
    """
    require("int8 through LiteRT")
    import torch

    with _quiet_converter():
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        example = calibration[:1]  # (1, C, H, W)
        prepared = prepare_pt2e(torch.export.export(model.eval(), (example,)).module(), quantizer)
        with torch.no_grad():
            for image in calibration.split(1):  # observers record each image's ranges
                prepared(image)
        quantized = convert_pt2e(prepared, fold_quantize=False)
    return Quantized(quantized, quantizer, int8_file(quantized, quantizer, example, layout="nchw"))


def int8_file(program: nn.Module, quantizer, example: Tensor, *, layout: str) -> bytes:
    """The quantized ``program`` as a ``.tflite`` taking float32 images in ``layout``, giving float32 logits."""
    with _quiet_converter():
        import litert_torch
        from litert_torch.quantize.quant_config import QuantConfig

        converted = litert_torch.convert(
            _with_layout(program, layout), (_in_layout(example[:1], layout),),
            quant_config=QuantConfig(pt2e_quantizer=quantizer),
        )  # fmt: skip
        return float_io(bytes(converted.model_content()))


def float_io(flatbuffer: bytes) -> bytes:
    """``flatbuffer`` with float32 input and output where the converter left int8 ones.

    The converter folds the program's first quantize and last dequantize into the file's edges (int8
    input and output, with a scale and zero point an app would apply itself). This puts them back as
    operators, as TensorFlow's ``modify_model_interface`` does the other way round: a float32 input
    tensor, a QUANTIZE op into the int8 one, and a DEQUANTIZE op from the int8 output into a float32 one.
    The arithmetic inside is unchanged.
    """
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    (graph,) = model.subgraphs
    quantized = [i for i in [*graph.inputs, *graph.outputs] if graph.tensors[i].type != schema.TensorType.FLOAT32]
    if not quantized:
        return flatbuffer
    renamed = {}
    for index in quantized:
        inner = graph.tensors[index]
        outer = schema.TensorT()
        outer.name, outer.shape, outer.type = inner.name, list(inner.shape), schema.TensorType.FLOAT32
        outer.shapeSignature = None if inner.shapeSignature is None else list(inner.shapeSignature)
        inner.name = inner.name + b"_int8"
        graph.tensors.append(outer)
        renamed[index] = len(graph.tensors) - 1
    ops = []
    for index in graph.inputs:
        if index in renamed:  # float32 -> QUANTIZE -> the int8 input the program reads
            ops.append(_operator(model, schema.BuiltinOperator.QUANTIZE, renamed[index], index))
    graph.operators = [*ops, *graph.operators]
    for index in graph.outputs:
        if index in renamed:  # the int8 logits -> DEQUANTIZE -> float32
            graph.operators.append(_operator(model, schema.BuiltinOperator.DEQUANTIZE, index, renamed[index]))
    graph.inputs = [renamed.get(i, i) for i in graph.inputs]
    graph.outputs = [renamed.get(i, i) for i in graph.outputs]
    for signature in model.signatureDefs or ():
        for tensor in [*(signature.inputs or ()), *(signature.outputs or ())]:
            tensor.tensorIndex = renamed.get(tensor.tensorIndex, tensor.tensorIndex)
    return _pack(model, len(flatbuffer))


def _operator(model, code: int, source: int, target: int):
    """An operator of builtin ``code`` from tensor ``source`` to ``target``, its code added to the model's list if new."""
    from ai_edge_litert import schema_py_generated as schema

    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    if code not in codes:
        entry = schema.OperatorCodeT()
        entry.builtinCode, entry.deprecatedBuiltinCode, entry.version = code, min(code, 127), 1
        model.operatorCodes.append(entry)
        codes.append(code)
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = codes.index(code), [source], [target]
    return op


def _pack(model, size_hint: int) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(size_hint + 1024)
    builder.Finish(model.Pack(builder), file_identifier=_IDENTIFIER)
    return bytes(builder.Output())


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The deploy metadata stored in a ``.tflite`` as strings, as every engine gives it (``{}`` when it has none).

    Reads both our entry's formats: JSON values (:data:`_FORMAT`), and the JSON strings of files before it.

    Raises:
        ValueError: ``path`` is not a whole TFLite flatbuffer (another format, truncated); one line.
    """
    path = Path(path)
    model = _read_model(path)
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        if entry.Name() == METADATA_NAME.encode():
            try:
                stored = json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
            except (struct.error, IndexError, AttributeError, ValueError):
                raise ValueError(f"{path} is damaged: its {METADATA_NAME!r} metadata cannot be read") from None
            if not isinstance(stored, dict):
                raise ValueError(f"{path}: its {METADATA_NAME!r} metadata is not a JSON object")
            return _as_strings(stored, path)
    return {}


def _as_values(metadata: Mapping[str, str]) -> dict:
    """Our entry's JSON object: each JSON-text value decoded (``"[0.5]"`` -> ``[0.5]``), plain text kept."""
    values = {_FORMAT_KEY: _FORMAT}
    for key, value in metadata.items():
        if key in _TEXT_KEYS:
            values[key] = value
            continue
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"metadata {key}={value!r} is neither JSON nor one of {', '.join(_TEXT_KEYS)}") from None
    return values


def _as_strings(stored: Mapping, path: Path) -> dict[str, str]:
    """:func:`_as_values` undone: the strings every engine's metadata holds."""
    if stored.get(_FORMAT_KEY) != _FORMAT:  # format 1: a mapping of strings already
        if not all(isinstance(v, str) for v in stored.values()):
            raise ValueError(f"{path}: its {METADATA_NAME!r} metadata is not a mapping of strings")
        return dict(stored)
    return {
        key: value if key in _TEXT_KEYS and isinstance(value, str) else json.dumps(value)
        for key, value in stored.items()
        if key != _FORMAT_KEY
    }


def read_labels(path: str | os.PathLike) -> list[str] | None:
    """The class names packed in a ``.tflite`` as :data:`LABELS_FILE` (TFLite's convention), or None when none is."""
    data = Path(path).read_bytes()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.read(LABELS_FILE).decode().splitlines()
    except (zipfile.BadZipFile, KeyError):
        return None


def load(
    path: str | os.PathLike, *, threads: int | None = None, layout: str | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """``path`` in LiteRT's interpreter: float32 images ``(B, C, H, W)`` -> float32 logits ``(B, classes)``.

    The file has a fixed batch of 1; a batch of B is run as B calls, one image each. An NHWC file
    (its metadata's ``input_layout``, or ``layout``) gets each image transposed; an int8 file of
    before float I/O gets its images quantized and its logits dequantized with its own scales.

    Raises:
        ValueError: ``path`` is not a TFLite model LiteRT can load; one line.
    """
    require("running a .tflite")
    from ai_edge_litert.interpreter import Interpreter

    path = Path(path)
    layout = layout or read_metadata(path).get("input_layout", "NCHW").lower()  # also: a truncated file, in one line
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"LiteRT cannot load {path}: {_first_line(err)}") from None
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    shape = tuple(int(n) for n in source["shape"])  # (1, C, H, W) or (1, H, W, C)
    image_shape = (shape[3], *shape[1:3]) if layout == "nhwc" else shape[1:]  # (C, H, W)
    quantize, dequantize = _io_conversions(source, target)

    def run(images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != image_shape:
            raise ValueError(f"{path.name} takes images of {image_shape} (C, H, W); got a batch of {images.shape}")
        if layout == "nhwc":
            images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # (B, H, W, C)
        logits = []
        for image in images:
            interpreter.set_tensor(source["index"], quantize(image[None]))
            interpreter.invoke()
            logits.append(dequantize(interpreter.get_tensor(target["index"])[0]))
        return np.stack(logits)  # (B, classes)

    return run


def _io_conversions(source: dict, target: dict) -> tuple[Callable, Callable]:
    """float32 -> the input's type, and the output's type -> float32: the identity for a float32 file,
    the file's own scale and zero point for an int8 one (written before :func:`float_io`)."""
    if source["dtype"] == np.float32 and target["dtype"] == np.float32:
        return np.asarray, np.array  # np.array copies: the interpreter reuses its output buffer
    (in_scale, in_zero), (out_scale, out_zero) = source["quantization"], target["quantization"]
    info = np.iinfo(source["dtype"])

    def quantize(images: np.ndarray) -> np.ndarray:
        return np.clip(np.round(images / in_scale) + in_zero, info.min, info.max).astype(source["dtype"])

    def dequantize(logits: np.ndarray) -> np.ndarray:
        return ((logits.astype(np.float32) - out_zero) * out_scale).astype(np.float32)

    return quantize, dequantize


def with_metadata(flatbuffer: bytes, metadata: Mapping[str, str]) -> bytes:
    """``flatbuffer`` with our entry (``metadata`` as one JSON object) and TFLite's standard one, labels appended.

    The standard entry (:func:`standard_metadata`) is written from what ``metadata`` says (model,
    classes, normalization, class names); with class names, :data:`LABELS_FILE` follows the
    flatbuffer in a zip archive, as TFLite's metadata populator packs it (the interpreter reads the
    flatbuffer only; a zip reader finds the archive from the end).
    """
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    if any(buffer.offset for buffer in model.buffers or ()):  # weights after the flatbuffer (files over 2 GB)
        raise ValueError("the LiteRT converter stored the weights outside the flatbuffer (a model over 2 GB)")
    # Keys in the order given: sorted, a nested object (model_kwargs) would read back as other text.
    ours = json.dumps(_as_values(metadata)).encode()
    names = _class_names(metadata)
    entries = [
        entry for entry in model.metadata or () if entry.name not in (METADATA_NAME.encode(), STANDARD_NAME.encode())
    ]
    for name, payload in ((METADATA_NAME, ours), (STANDARD_NAME, standard_metadata(metadata, labels=bool(names)))):
        model.buffers.append(schema.BufferT(data=np.frombuffer(payload, dtype=np.uint8)))
        entries.append(schema.MetadataT(name=name.encode(), buffer=len(model.buffers) - 1))
    model.metadata = entries
    packed = _pack(model, len(flatbuffer) + len(ours) + 4096)
    if not names:
        return packed
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as labels:
        labels.writestr(LABELS_FILE, "\n".join(names) + "\n")
    return packed + archive.getvalue()


def _class_names(metadata: Mapping[str, str]) -> list[str]:
    names = json.loads(metadata.get("class_names", "[]"))
    return [str(name) for name in names] if isinstance(names, list) else []


def standard_metadata(metadata: Mapping[str, str], *, labels: bool) -> bytes:
    """The ``ModelMetadata`` flatbuffer of TFLite's metadata convention (``metadata_schema.fbs``) for ``metadata``.

    Input: an image (RGB, or grayscale for one channel) normalized as ``(pixel - mean) / std`` with
    pixels in 0-255, the convention's unit (so ``mean * 255`` and ``std * 255`` of the model's 0-1
    ones); output: the logits, its axis labelled by :data:`LABELS_FILE` when ``labels``.
    """
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    shape = json.loads(metadata.get("input_shape", "null")) or []
    layout = metadata.get("input_layout", "NCHW")
    channels = (shape[3] if layout == "NHWC" else shape[1]) if len(shape) == 4 else int(metadata.get("in_chans", "3"))
    description = (
        f"Image classifier, {metadata.get('num_classes', '?')} classes. Input: float32 {layout} {shape}, "
        f"pixels normalized as (pixel - mean) / std, pixels in 0-255. Output: float32 logits (argmax: the class)."
    )
    units = []
    if "mean" in metadata and "std" in metadata:
        mean = [255 * m for m in json.loads(metadata["mean"])]
        std = [255 * s for s in json.loads(metadata["std"])]
        options = _table(builder, {0: _floats(builder, mean), 1: _floats(builder, std)})  # NormalizationOptions
        units.append(_table(builder, {1: options}, {0: 1}))  # ProcessUnit: options_type NormalizationOptions
    colour = {3: 1, 1: 2}.get(channels, 0)  # ColorSpaceType RGB, GRAYSCALE, else UNKNOWN
    image = _table(builder, {}, {0: colour})  # ImageProperties
    content = _table(builder, {1: image}, {0: 2})  # Content: ContentProperties ImageProperties
    input_fields = {0: builder.CreateString("image"), 1: builder.CreateString(description), 3: content}
    if units:
        input_fields[4] = _vector(builder, units)
    tensor_in = _table(builder, input_fields)  # TensorMetadata
    output_fields = {0: builder.CreateString("logits"), 1: builder.CreateString("One score per class.")}
    output_fields[3] = _table(builder, {1: _table(builder, {})}, {0: 1})  # Content: FeatureProperties
    if labels:
        name, what = builder.CreateString(LABELS_FILE), builder.CreateString("The class names, one a line.")
        output_fields[6] = _vector(builder, [_table(builder, {0: name, 1: what}, {2: 2})])  # TENSOR_AXIS_LABELS
    tensor_out = _table(builder, output_fields)
    subgraph = _table(builder, {2: _vector(builder, [tensor_in]), 3: _vector(builder, [tensor_out])})
    root = _table(
        builder,
        {
            0: builder.CreateString(metadata.get("model", "model")),
            1: builder.CreateString(description),
            3: _vector(builder, [subgraph]),
            4: builder.CreateString("repblocks"),
            7: builder.CreateString("1.0.0"),  # min_parser_version: the fields above are all in 1.0.0
        },
    )
    builder.Finish(root, file_identifier=b"M001")
    return bytes(builder.Output())


def _table(builder, offsets: Mapping[int, int], bytes_: Mapping[int, int] | None = None) -> int:
    """A flatbuffer table: ``offsets`` (slot -> an offset made before) and ``bytes_`` (slot -> a uint8)."""
    builder.StartObject(1 + max([*offsets, *(bytes_ or {}), -1]))
    for slot, value in (bytes_ or {}).items():
        builder.PrependUint8Slot(slot, value, 0)
    for slot, offset in offsets.items():
        builder.PrependUOffsetTRelativeSlot(slot, offset, 0)
    return builder.EndObject()


def _vector(builder, offsets: Sequence[int]) -> int:
    builder.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def _floats(builder, values: Sequence[float]) -> int:
    builder.StartVector(4, len(values), 4)
    for value in reversed(values):
        builder.PrependFloat32(float(value))
    return builder.EndVector()


def _read_model(path: Path):
    """The flatbuffer root of ``path``, after checking it is a TFLite file that is all there."""
    require("reading a .tflite")
    from ai_edge_litert import schema_py_generated as schema

    data = path.read_bytes()
    if data[4:8] != _IDENTIFIER:
        raise ValueError(f"{path} is not a TFLite model (no {_IDENTIFIER.decode()} identifier)")
    try:
        model = schema.Model.GetRootAs(data, 0)
        # Touch every table the checks read: a truncated file fails here, not later in the interpreter.
        for index in range(model.BuffersLength()):
            model.Buffers(index).DataLength()
        for index in range(model.SubgraphsLength()):
            model.Subgraphs(index).OperatorsLength()
        for index in range(model.MetadataLength()):
            model.Metadata(index).Name()
    except (struct.error, IndexError, ValueError):
        raise ValueError(f"{path} is truncated or damaged: its TFLite flatbuffer cannot be read") from None
    return model


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """Inside, the converter prints no progress to stdout (which belongs to the caller) and logs no info lines.

    ``LITERT_TORCH_SHOW_PROGRESS=n`` turns off its progress lines; its "Use JAX lowering: <op>"
    records (on the root logger, one per op) and JAX's own info records (no TPU here) are dropped;
    TensorFlow's C++ logging below warnings is off unless the user chose a level (JAX, which it
    imports, would set 1: info lines). All but the C++ level (read once) are set back afterwards.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    previous = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = previous or "n"
    root, jax_log = logging.getLogger(), logging.getLogger("jax")
    jax_level = jax_log.level
    root.addFilter(_drop_lowering_notes)
    jax_log.setLevel(max(jax_level, logging.WARNING))
    try:
        yield
    finally:
        root.removeFilter(_drop_lowering_notes)
        jax_log.setLevel(jax_level)
        if previous is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)


def _drop_lowering_notes(record: logging.LogRecord) -> bool:
    return not (record.levelno < logging.WARNING and str(record.msg).startswith("Use JAX lowering"))


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def write_tflite(
    model_bytes: bytes, path: Path, metadata: Mapping[str, str], reference, example: Tensor, check, *, layout: str
) -> dict:
    """Write ``model_bytes`` at ``path`` with ``metadata`` and what the file takes (:func:`io_metadata`) inside,
    once LiteRT, reading the file as a phone would (its layout, float32 in and out), reproduces ``reference``."""
    metadata = {**metadata, **io_metadata(tuple(example.shape[1:]), layout=layout)}
    with atomic_path(path) as tmp:
        tmp.write_bytes(with_metadata(model_bytes, metadata))
        run = _as_runner(load(tmp))
        errors = check_outputs(reference, run, example, check=check, what=f"LiteRT reading {path.name}")
        if _as_values(read_metadata(tmp)) != _as_values(metadata):  # the same values, however the JSON was spaced
            raise OutputMismatch(f"{path.name} does not read back the metadata written into it")
    return errors


def _as_runner(run: Callable[[np.ndarray], np.ndarray], metadata: dict[str, str] | None = None) -> Runner:
    def bind(images: Tensor) -> Callable[[], object]:
        batch = images.numpy()  # (B, C, H, W) float32
        return lambda: run(batch)

    return Runner(lambda images: torch.from_numpy(run(images.numpy())), bind, metadata=metadata or {}, max_batch=1)


class LiteRT(Engine):
    name = "litert"
    title = "LiteRT"
    backends = ("litert",)

    def missing(self, device=None):
        return missing()

    def export(self, model, path, example, metadata, *, check, precision="fp32"):
        flatbuffer = convert(model, example, {}, layout=check.layout)
        errors = write_tflite(flatbuffer, Path(path), metadata, model, example, check, layout=check.layout)
        runtime = f"{version()} ({check.layout.upper()} input; batch fixed at 1; a larger batch runs image by image)"
        return {"path": str(path), "format": "litert", "runtime": runtime, **errors}

    def read_metadata(self, path):
        return read_metadata(path)

    def open(self, path, threads, *, precision=None):
        metadata = read_metadata(path)
        return _as_runner(load(path, threads=threads), metadata)

    def runner(self, model, backend, dtype, *, device, workdir, image_shape, max_batch=128):
        example = torch.randn(2, *image_shape)
        path = workdir / "model.tflite"
        path.write_bytes(convert(model, example, {}, layout=LAYOUTS[0]))  # as exported by default
        built = _as_runner(load(path, threads=torch.get_num_threads(), layout=LAYOUTS[0]))
        check_engine(model, built, example, dtype=dtype, what=f"litert {dtype}")
        return built

    def int8(self, model, calibration, *, metadata, worst_layers=0):
        """litert_torch's PT2E quantizer (static, per-channel weights) into a ``.tflite``, run by LiteRT's interpreter."""
        import tempfile

        quantized = int8(model, calibration)
        with tempfile.TemporaryDirectory(prefix="repblocks-int8-") as tmp:
            path = Path(tmp) / "int8.tflite"
            path.write_bytes(quantized.flatbuffer)
            run = _as_runner(load(path, layout="nchw")).run  # the interpreter keeps what it read: the folder may go
        return Int8Artifact("litert_torch PT2E static, per-channel weights, LiteRT", quantized, run)

    def write_int8(self, int8, path, metadata, example, *, check):
        """The gated program in ``check.layout``: the same quantized arithmetic, checked against the gated file's logits."""
        quantized = int8.model
        flatbuffer = (
            quantized.flatbuffer
            if check.layout == "nchw"
            else int8_file(quantized.program, quantized.quantizer, example, layout=check.layout)
        )
        errors = write_tflite(flatbuffer, Path(path), metadata, int8.run, example, check, layout=check.layout)
        return {"runtime": version(), **errors}


ENGINE = LiteRT()
