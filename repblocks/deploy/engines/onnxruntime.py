"""onnxruntime (part of ``[deploy]``): ``model.onnx``, its int8 QDQ twin ``model_int8.onnx``, timed on the CPU or a GPU.

* export (:func:`export_onnx`): ``torch.onnx.export(dynamo=True)``, the torch.export-based exporter
  that is torch's default since 2.9 (the TorchScript-based one warns that it will be removed). It
  needs ``onnxscript`` and nothing online. The batch axis is dynamic; onnxruntime runs the file back
  at batch 1 and 3. The deploy metadata is in the model's ``metadata_props`` (:func:`with_metadata`,
  the one writer of it, fp32 and int8 alike);
* int8 (:func:`quantize_qdq`): onnxruntime's static quantizer, QDQ, int8 weights per channel and
  uint8 activations; its QDQ debugger measures the worst layers (SQNR) for the report;
* timing: ``onnxruntime`` (the CPU or CUDA provider) and ``onnxruntime_trt`` (its TensorRT provider);
  sessions run on torch's thread count and do not spin idle threads, which would steal torch's cores.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from repblocks.deploy.engines.base import Check, Engine, Int8Artifact, Int8Model, Runner, check_outputs
from repblocks.errors import UserError
from repblocks.files import atomic_path
from repblocks.int8 import example_batch
from repblocks.int8.accuracy import BATCH
from repblocks.int8.conversion import dynamic_axes

__all__ = ["ENGINE", "export_onnx", "onnx_session", "quantize_qdq", "with_metadata"]

log = logging.getLogger(__name__)

_ONNX_SIZE_LIMIT = 2**31  # protobuf's limit for one file; we write no external-data side files


def version() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def onnx_session(path: str | Path | bytes, *, threads: int | None = None, providers: Sequence | None = None):
    """An onnxruntime session for ``path`` (or its bytes); ``threads`` intra-op threads (default: torch's count)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    # By default its idle threads spin for work; in a process that also runs torch they would steal torch's cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(
        path if isinstance(path, bytes) else str(path),
        sess_options=options,
        providers=list(providers or ["CPUExecutionProvider"]),
    )


def session_runner(session, *, metadata: dict[str, str] | None = None) -> Runner:
    """An onnxruntime session as a :class:`Runner`; timed with its feed prepared once."""
    name = session.get_inputs()[0].name

    def run(images: Tensor) -> Tensor:
        return torch.from_numpy(np.asarray(session.run(None, {name: images.contiguous().numpy()})[0]))

    def bind(images: Tensor) -> Callable[[], object]:
        feed = {name: images.numpy()}  # on CUDA, each call copies it to the GPU and the logits back
        return lambda: session.run(None, feed)

    return Runner(run, bind, metadata=metadata or {})


def with_metadata(model_bytes: bytes, metadata: Mapping[str, str]) -> bytes:
    """``model_bytes`` (an ONNX model) with ``metadata`` in its ``metadata_props``: the one writer of ONNX metadata."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: Tensor,
    *,
    atol: float,
    rtol: float,
    opset: int | None = None,
    metadata: Mapping[str, str] | None = None,
    dynamic_size: bool = False,
) -> dict:
    """Export ``model`` to ONNX with a dynamic batch axis; onnxruntime must reproduce its outputs.

    Args:
        model: A float32 CPU model in eval mode.
        path: Destination ``.onnx`` file (self-contained: no external-data file beside it).
        example: An input batch of size 2, ``(2, C, H, W)``: the other axes are fixed to its.
        atol, rtol: Tolerance of onnxruntime's outputs (see ``repblocks.numerics.within_tolerance``).
        opset: ONNX opset, at least ``MIN_ONNX_OPSET``; the exporter's default when None.
        metadata: Strings for the model's ``metadata_props`` (name, preprocessing, ...).
        dynamic_size: Height and width dynamic too (a fully convolutional network timed at another size).

    Raises:
        ValueError: The model is too large for one ONNX file, the exporter wrote another opset,
            onnxruntime cannot load the file, or its outputs differ.
    """
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size >= _ONNX_SIZE_LIMIT:
        raise ValueError(f"the model's {size / 2**30:.1f} GiB of weights exceed one ONNX file's 2 GiB limit")
    path = Path(path)
    with atomic_path(path) as tmp:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=(dynamic_axes(dynamic_size),),
            opset_version=opset,
            verbose=False,  # its progress lines would go to stdout, which belongs to the caller
        )
        written = program.model.opset_imports.get("")
        if opset is not None and written != opset:
            raise UserError(
                f"the ONNX exporter cannot write opset {opset} (it wrote {written}): choose another export.onnx_opset"
            )
        program.save(tmp, external_data=False)  # one file, so that the atomic rename moves all of it
        if metadata:
            tmp.write_bytes(with_metadata(tmp.read_bytes(), metadata))
        try:
            session = onnx_session(tmp)
        except Exception as err:  # onnxruntime's own exception types; an opset it does not know, say
            raise ValueError(f"{version()} cannot load the export: {err}") from None
        errors = check_outputs(model, session_runner(session), example, check=Check(atol, rtol), what="onnxruntime")
    return {"path": str(path), "format": "onnx", "runtime": version(), **errors}


def quantize_qdq(
    model: nn.Module, calibration: Tensor, workdir: Path, *, per_channel: bool = True
) -> tuple[Path, Path]:
    """``model`` quantized by onnxruntime's static quantizer: QDQ, int8 weights (per channel), uint8 activations.

    ``per_channel=False``: one weight scale per layer, as TensorRT's implicit int8 and many NPUs use;
    where RepVGG's fused kernels, with their per-channel ranges far apart, are known to break.

    Returns:
        The float32 model as quantized (after onnxruntime's pre-processing) and the QDQ model, both in ``workdir``.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, prepared, int8_path = workdir / "fp32.onnx", workdir / "prepared.onnx", workdir / "int8.onnx"
    export_onnx(model, fp32_path, example_batch(calibration), atol=1e-3, rtol=1e-3, dynamic_size=True)
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(int8_path),
        _reader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return prepared, int8_path


def timing_onnx(model: nn.Module, workdir: Path, image_shape: tuple[int, int, int]) -> Path:
    """The ONNX file of ``model`` that the ONNX-reading backends time, written once per form into ``workdir``."""
    path = workdir / "model.onnx"
    if not path.exists():  # one export per form, shared by onnxruntime, its TensorRT provider and TensorRT
        export_onnx(model, path, torch.randn(2, *image_shape), atol=1e-3, rtol=1e-3)
    return path


class OnnxRuntime(Engine):
    name = "onnxruntime"
    title = "onnxruntime"
    backends = ("onnxruntime", "onnxruntime_trt")

    def export(self, model, path, example, metadata, *, check, precision="fp32"):
        return export_onnx(
            model, path, example, atol=check.atol, rtol=check.rtol, opset=check.onnx_opset, metadata=metadata
        )

    def read_metadata(self, path: Path) -> dict[str, str]:
        return {entry.key: entry.value for entry in _read_proto(Path(path).read_bytes(), path).metadata_props}

    def open(self, path: Path, threads: int, *, precision: str | None = None) -> Runner:
        data = Path(path).read_bytes()
        proto = _read_proto(data, path)
        if _external_data(proto.graph):
            # Its weights would be read from files the model names: a file from elsewhere opens no other file.
            raise UserError(
                f"{path} keeps tensors in other files (ONNX external data); predict reads self-contained files"
            )
        try:
            session = onnx_session(data, threads=threads)  # from the bytes read: what was checked is what runs
        except Exception as err:  # onnxruntime's own exception types
            raise UserError(f"onnxruntime cannot load {path}: {_first_line(err)}") from None
        return session_runner(session, metadata={entry.key: entry.value for entry in proto.metadata_props})

    def applicable(self, backend, dtype, device):
        if backend == "onnxruntime_trt":
            if device.type != "cuda":
                return "onnxruntime's TensorRT provider runs on NVIDIA GPUs only; this run is on the CPU"
            if "TensorrtExecutionProvider" not in _providers():
                return f"this onnxruntime has no TensorrtExecutionProvider (it has {', '.join(_providers())})"
            return None if dtype in ("fp32", "fp16") else "onnxruntime's TensorRT provider builds fp32 and fp16 engines"
        if dtype == "fp16" and device.type == "cpu":
            return (
                "fp16 convolutions on the CPU are slow emulations, not a deployment setting (bf16 is timed on the CPU)"
            )
        if dtype != "fp32":
            return "the ONNX export is float32; onnxruntime runs it as such"
        if device.type == "cuda" and "CUDAExecutionProvider" not in _providers():
            return f"this onnxruntime has no CUDAExecutionProvider (it has {', '.join(_providers())})"
        return None

    def runner(self, model, backend, dtype, *, device, workdir, image_shape, max_batch=128):
        path = timing_onnx(model, workdir, image_shape)
        if backend == "onnxruntime_trt":
            providers = [("TensorrtExecutionProvider", {"trt_fp16_enable": dtype == "fp16"}), "CUDAExecutionProvider"]
        else:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
        return session_runner(onnx_session(path, providers=providers))

    def int8(self, model, calibration, *, metadata, worst_layers=0):
        with tempfile.TemporaryDirectory(prefix="repblocks-int8-") as tmp:
            prepared, int8_path = quantize_qdq(model, calibration, Path(tmp))
            model_bytes = int8_path.read_bytes()
            worst = _worst_layers(prepared, int8_path, calibration[: 2 * BATCH], worst_layers) if worst_layers else []
        run = _int8_run(model_bytes)
        return Int8Artifact("onnxruntime static QDQ, per-channel weights", model_bytes, run, worst_layers=worst)

    def write_int8(self, int8: Int8Model, path, metadata, example, *, check):
        with atomic_path(path) as tmp:
            tmp.write_bytes(with_metadata(int8.model, metadata))
            errors = check_outputs(
                int8.run,
                session_runner(onnx_session(tmp)),
                example,
                check=check,
                what=f"onnxruntime reading {path.name}",
            )
        return {"runtime": version(), **errors}

    def int8_runners(self, passed, *, device, backends):
        if "onnxruntime" not in passed or device.type != "cpu" or "onnxruntime" not in backends:
            return {}
        qdq = passed["onnxruntime"].model  # the QDQ ONNX file's bytes
        return {"onnxruntime": lambda _: session_runner(onnx_session(qdq))}


def _int8_run(model_bytes: bytes) -> Callable[[Tensor], Tensor]:
    return session_runner(onnx_session(model_bytes)).run


def _providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


def _read_proto(data: bytes, path):
    import onnx

    try:
        return onnx.load_from_string(data)
    except Exception as err:  # protobuf's DecodeError and others, for a file that is not ONNX
        raise UserError(f"cannot read {path}: not an ONNX model ({_first_line(err)})") from None


def _external_data(graph) -> bool:
    """Whether any tensor of ``graph`` (initializers, constants, subgraphs) lives in another file."""
    import onnx

    tensors = list(graph.initializer)
    for node in graph.node:
        for attribute in node.attribute:
            tensors += [attribute.t, *attribute.tensors]
            if any(_external_data(subgraph) for subgraph in [attribute.g, *attribute.graphs]):
                return True
    return any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in tensors)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def _reader(images: Tensor):
    """onnxruntime's calibration data reader over ``images``, a batch at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(images.split(BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.numpy()}

    return Reader()


def _worst_layers(fp32_path: Path, int8_path: Path, images: Tensor, count: int) -> list[dict]:
    """The ``count`` layer outputs with the lowest SQNR (dB) in the int8 model against the fp32 one."""
    from onnxruntime.quantization import qdq_loss_debug as debug

    activations = {}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        augmented = path.with_name(f"{name}-debug.onnx")
        debug.modify_model_output_intermediate_tensors(str(path), str(augmented))
        activations[name] = debug.collect_activations(str(augmented), _reader(images))
    errors = debug.compute_activation_error(debug.create_activation_matching(activations["int8"], activations["fp32"]))
    modules = _producing_modules(fp32_path)
    layers = [
        {"layer": modules[name], "tensor": name, "sqnr_db": float(err["xmodel_err"])}
        for name, err in errors.items()
        if name in modules and "xmodel_err" in err
    ]
    return sorted(layers, key=lambda layer: layer["sqnr_db"])[:count]


def _producing_modules(path: Path) -> dict[str, str]:
    """``{tensor: module name}`` for the outputs of the layers (Relu, Conv, Gemm), from the exporter's name scopes."""
    import ast

    import onnx

    names = {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type not in ("Relu", "Conv", "Gemm"):
            continue
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
        scopes = ast.literal_eval(scopes) if scopes else [node.name]
        names[node.output[0]] = scopes[-2] if len(scopes) > 1 else scopes[-1]  # the module, not the op
    return names


ENGINE = OnnxRuntime()
