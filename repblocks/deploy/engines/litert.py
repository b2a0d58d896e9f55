"""LiteRT (extra ``[litert]``, formerly TensorFlow Lite): a deploy form as ``model.tflite``, run by LiteRT's interpreter.

The converter is ``litert_torch`` (``litert_torch.convert(model, (example,))``), which lowers a
``torch.export`` program; the runtime is ``ai_edge_litert``'s interpreter (XNNPACK on the CPU).
Both are imported only inside these functions, so importing :mod:`repblocks.deploy` never loads
them (nor the JAX and TensorFlow pieces they pull in).

The file takes float32 images in NCHW, as the model does (the converter keeps the layout of the
program it is given and transposes inside), at the model's own input size and a **fixed batch of
1**: the batch size a phone runs, and the only one the converter's static shapes promise. A
larger batch is run image by image (:func:`load`). The deploy metadata (model, preprocessing,
class names) is stored inside the file, in the flatbuffer's ``metadata`` list under
:data:`METADATA_NAME`, written with the TFLite schema that ``ai_edge_litert`` ships.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from repblocks.deploy.engines.base import Engine, Int8Artifact, Runner, check_engine, check_outputs
from repblocks.errors import UserError
from repblocks.files import atomic_path

__all__ = [
    "ENGINE",
    "INSTALL",
    "METADATA_NAME",
    "convert",
    "int8",
    "load",
    "missing",
    "read_metadata",
    "require",
    "version",
    "with_metadata",
]

INSTALL = "pip install 'repblocks[litert]'"
METADATA_NAME = "repblocks"  # one entry of the flatbuffer's metadata list: the deploy metadata as a JSON object
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


def convert(model: nn.Module, example: Tensor, metadata: Mapping[str, str]) -> bytes:
    """The ``.tflite`` flatbuffer of ``model`` for ``example``'s shape (batch 1: ``(1, C, H, W)``), metadata inside if any."""
    require("the LiteRT export")
    with _quiet_converter():
        import litert_torch

        flatbuffer = litert_torch.convert(model.eval(), (example[:1],)).model_content()
    return with_metadata(bytes(flatbuffer), metadata) if metadata else bytes(flatbuffer)


def int8(model: nn.Module, calibration: Tensor) -> bytes:
    """``model`` quantized to int8 by the converter's PT2E quantizer, as a ``.tflite`` flatbuffer (no metadata).

    Static, symmetric, per-channel weights (litert_torch's ``get_symmetric_quantization_config``),
    calibrated on ``calibration`` ``(N, C, H, W)`` an image at a time (the program has batch 1). The
    file's input and output are int8 too; :func:`load` quantizes and dequantizes them with the file's
    own scales, so its callers give float32 images and get float32 logits as from every export.
    """
    require("int8 through LiteRT")
    import torch

    with _quiet_converter():
        import litert_torch
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        example = calibration[:1]  # (1, C, H, W)
        prepared = prepare_pt2e(torch.export.export(model.eval(), (example,)).module(), quantizer)
        with torch.no_grad():
            for image in calibration.split(1):  # observers record each image's ranges
                prepared(image)
        quantized = convert_pt2e(prepared, fold_quantize=False)
        converted = litert_torch.convert(quantized, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
        return bytes(converted.model_content())


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The deploy metadata stored in a ``.tflite`` (``{}`` when it has none).

    Raises:
        ValueError: ``path`` is not a whole TFLite flatbuffer (another format, truncated); one line.
    """
    path = Path(path)
    model = _read_model(path)
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        if entry.Name() == METADATA_NAME.encode():
            try:
                payload = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
                stored = json.loads(payload)
            except (struct.error, IndexError, AttributeError, ValueError):
                raise ValueError(f"{path} is damaged: its {METADATA_NAME!r} metadata cannot be read") from None
            if not isinstance(stored, dict) or not all(isinstance(v, str) for v in stored.values()):
                raise ValueError(f"{path}: its {METADATA_NAME!r} metadata is not a mapping of strings")
            return stored
    return {}


def load(path: str | os.PathLike, *, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``path`` in LiteRT's interpreter: float32 images ``(B, C, H, W)`` -> float32 logits ``(B, classes)``.

    The file has a fixed batch of 1; a batch of B is run as B calls, one image each.

    Raises:
        ValueError: ``path`` is not a TFLite model LiteRT can load; one line.
    """
    require("running a .tflite")
    from ai_edge_litert.interpreter import Interpreter

    path = Path(path)
    _read_model(path)  # a truncated file: our one-line error, before the interpreter's
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"LiteRT cannot load {path}: {_first_line(err)}") from None
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    shape = tuple(int(n) for n in source["shape"])  # (1, C, H, W)
    quantize, dequantize = _io_conversions(source, target)

    def run(images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != shape[1:]:
            raise ValueError(f"{path.name} takes images of {shape[1:]} (C, H, W); got a batch of {images.shape}")
        logits = []
        for image in images:  # (C, H, W)
            interpreter.set_tensor(source["index"], quantize(image[None]))
            interpreter.invoke()
            logits.append(dequantize(interpreter.get_tensor(target["index"])[0]))
        return np.stack(logits)  # (B, classes)

    return run


def _io_conversions(source: dict, target: dict) -> tuple[Callable, Callable]:
    """float32 -> the input's type, and the output's type -> float32: the identity for a float32 file,
    the file's own scale and zero point for an int8 one."""
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
    """``flatbuffer`` rewritten with one more metadata entry: a buffer holding ``metadata`` as JSON."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    if any(buffer.offset for buffer in model.buffers or ()):  # weights after the flatbuffer (files over 2 GB)
        raise ValueError("the LiteRT converter stored the weights outside the flatbuffer (a model over 2 GB)")
    payload = json.dumps(dict(metadata), sort_keys=True).encode()
    model.buffers.append(schema.BufferT(data=np.frombuffer(payload, dtype=np.uint8)))
    entries = [entry for entry in model.metadata or () if entry.name != METADATA_NAME.encode()]
    model.metadata = [*entries, schema.MetadataT(name=METADATA_NAME.encode(), buffer=len(model.buffers) - 1)]
    builder = flatbuffers.Builder(len(flatbuffer) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=_IDENTIFIER)
    return bytes(builder.Output())


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
    model_bytes: bytes, path: Path, metadata: Mapping[str, str], reference, example: Tensor, check
) -> dict:
    """Write ``model_bytes`` with ``metadata`` inside at ``path``, once LiteRT, reading the file, reproduces ``reference``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(with_metadata(model_bytes, metadata))
        run = _as_runner(load(tmp))
        errors = check_outputs(reference, run, example, check=check, what=f"LiteRT reading {path.name}")
        if read_metadata(tmp) != dict(metadata):
            raise ValueError(f"{path.name} does not read back the metadata written into it")
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
        errors = write_tflite(convert(model, example, {}), Path(path), metadata, model, example, check)
        runtime = f"{version()} (batch fixed at 1; a larger batch runs image by image)"
        return {"path": str(path), "format": "litert", "runtime": runtime, **errors}

    def read_metadata(self, path):
        return read_metadata(path)

    def open(self, path, threads, *, precision=None):
        metadata = read_metadata(path)
        return _as_runner(load(path, threads=threads), metadata)

    def runner(self, model, backend, dtype, *, device, workdir, image_shape, max_batch=128):
        example = torch.randn(2, *image_shape)
        path = workdir / "model.tflite"
        path.write_bytes(convert(model, example, {}))
        built = _as_runner(load(path, threads=torch.get_num_threads()))
        check_engine(model, built, example, dtype=dtype, what=f"litert {dtype}")
        return built

    def int8(self, model, calibration, *, metadata, worst_layers=0):
        """litert_torch's PT2E quantizer (static, per-channel weights) into a ``.tflite``, run by LiteRT's interpreter."""
        import tempfile

        model_bytes = int8(model, calibration)
        with tempfile.TemporaryDirectory(prefix="repblocks-int8-") as tmp:
            path = Path(tmp) / "int8.tflite"
            path.write_bytes(model_bytes)
            run = _as_runner(load(path)).run  # the interpreter keeps what it read: the folder may go
        return Int8Artifact("litert_torch PT2E static, per-channel weights, LiteRT", model_bytes, run)

    def write_int8(self, int8, path, metadata, example, *, check):
        return {"runtime": version(), **write_tflite(int8.model, Path(path), metadata, int8.run, example, check)}


ENGINE = LiteRT()
