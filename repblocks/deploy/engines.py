"""The engines a deploy form runs on: a *runner* is one model through one backend in one dtype on one device.

Backends: ``eager`` and ``channels_last`` (PyTorch), ``compile`` (``torch.compile``),
``onnxruntime`` (the model exported to ONNX, run by onnxruntime's CPU or CUDA provider),
``openvino`` and ``openvino_throughput`` (extra ``[openvino]``: the CPU in latency or throughput
mode, :mod:`repblocks.deploy.openvino`), ``executorch`` (extra ``[executorch]``, opt-in: the model
lowered to XNNPACK and run by ExecuTorch's runtime, :mod:`repblocks.deploy.executorch`), ``litert``
(extra ``[litert]``, opt-in: the ``.tflite`` export in LiteRT's interpreter, :mod:`repblocks.deploy.litert`);
both take one image per call, so a larger batch is timed as one call per image. On NVIDIA GPUs ``tensorrt`` (extra ``[tensorrt]``,
:mod:`repblocks.deploy.tensorrt`) and ``onnxruntime_trt`` (onnxruntime's TensorRT provider).
A backend that cannot run here is listed as skipped with the reason (:func:`applicable`). Each
runner turns a float32 CPU batch into a zero-argument callable, which
:mod:`repblocks.deploy.speed` times side by side with the others. int8 runners come from
``quantize=int8`` (:mod:`repblocks.deploy.quantize`), already quantized.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import Tensor, nn

from repblocks.deploy import executorch, litert, openvino, tensorrt
from repblocks.deploy.export import export_onnx, onnx_session
from repblocks.deploy.formats import BACKENDS, DEFAULT_BACKENDS, DTYPE_NAMES
from repblocks.numerics import max_errors

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKENDS",
    "DTYPES",
    "Candidate",
    "RunnerSpec",
    "applicable",
    "array_runner",
    "build_runner",
    "one_line",
]

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16), strict=True))
OPENVINO_MODES = {"openvino": "latency", "openvino_throughput": "throughput"}
Candidate = Callable[[], object]


@dataclass(frozen=True)
class RunnerSpec:
    """What one timed candidate runs: which model form, through which backend, in which dtype."""

    form: str  # "train"/"deploy", or a model name in the speed table
    backend: str
    dtype: str

    @property
    def key(self) -> str:
        return f"{self.form} {self.backend} {self.dtype}"


def applicable(backend: str, dtype: str, device: torch.device) -> str | None:
    """Why ``backend`` in ``dtype`` is not benchmarked on ``device``, or None when it is."""
    if backend in OPENVINO_MODES:
        if device.type != "cpu":
            return "OpenVINO is timed on the CPU; this run times the GPU"
        return openvino.missing() or (None if dtype == "fp32" else "OpenVINO is compiled with its fp32 precision hint")
    if backend == "executorch":
        if device.type != "cpu":
            return "ExecuTorch's XNNPACK backend is timed on the CPU; this run times the GPU"
        return executorch.missing() or (None if dtype == "fp32" else "the ExecuTorch export is float32")
    if backend == "tensorrt":
        return tensorrt.missing(device) or (
            None if dtype in ("fp32", "fp16") else "TensorRT builds fp32 and fp16 engines"
        )
    if backend == "onnxruntime_trt":
        if device.type != "cuda":
            return "onnxruntime's TensorRT provider runs on NVIDIA GPUs only; this run is on the CPU"
        if "TensorrtExecutionProvider" not in _ort_providers():
            return f"this onnxruntime has no TensorrtExecutionProvider (it has {', '.join(_ort_providers())})"
        return None if dtype in ("fp32", "fp16") else "onnxruntime's TensorRT provider builds fp32 and fp16 engines"
    if backend == "litert":
        if device.type != "cpu":
            return "LiteRT is timed on the CPU; this run times the GPU"
        return litert.missing() or (None if dtype == "fp32" else "the LiteRT export is float32")
    if dtype == "fp16" and device.type == "cpu":
        return "fp16 convolutions on the CPU are slow emulations, not a deployment setting (bf16 is timed on the CPU)"
    if backend == "onnxruntime" and dtype != "fp32":
        return "the ONNX export is float32; onnxruntime runs it as such"
    if backend == "onnxruntime" and device.type == "cuda" and "CUDAExecutionProvider" not in _ort_providers():
        return f"this onnxruntime has no CUDAExecutionProvider (it has {', '.join(_ort_providers())})"
    return None


def _ort_providers() -> list[str]:
    return onnxruntime.get_available_providers()


def build_runner(
    model: nn.Module,
    spec: RunnerSpec,
    device: torch.device,
    workdir: Path | None,
    image_shape: tuple[int, int, int],
    *,
    max_batch: int = 128,
) -> Callable[[Tensor], Candidate]:
    """Prepare ``model`` for ``spec``; the result turns a float32 CPU batch into a zero-argument candidate."""
    example = torch.randn(2, *image_shape)  # (2, C, H, W): the exports' example batch
    if spec.backend in OPENVINO_MODES:
        return openvino.runner(openvino.to_openvino(model, example), mode=OPENVINO_MODES[spec.backend])
    if spec.backend == "litert":
        path = workdir / f"{spec.form}.tflite"
        path.write_bytes(litert.convert(model, example, {}))
        built = array_runner(litert.load(path, threads=torch.get_num_threads()))
        _check_engine(model, built, example, spec)
        return built
    if spec.backend == "executorch":
        return et_runner(executorch.runner(executorch.lower(model, example)))
    if spec.backend in ("onnxruntime", "tensorrt", "onnxruntime_trt"):
        path = workdir / f"{spec.form}.onnx"
        if not path.exists():  # one export per form, shared by the backends that read ONNX
            export_onnx(model, path, example, atol=1e-3, rtol=1e-3)
        if spec.backend == "tensorrt":
            built = tensorrt.runner(path, dtype=spec.dtype, image_shape=image_shape, max_batch=max_batch, device=device)
        else:
            built = ort_runner(onnx_session(path, providers=_providers(spec, device)))
        if spec.backend != "onnxruntime":  # engines that build kernels of their own: checked like every export
            _check_engine(model, built, example, spec)
        return built
    dtype = DTYPES[spec.dtype]
    memory_format = torch.channels_last if spec.backend == "channels_last" else torch.contiguous_format
    runnable = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=memory_format)
    if spec.backend == "compile":
        runnable = torch.compile(runnable)
    elif spec.backend not in ("eager", "channels_last"):
        raise ValueError(f"unknown backend {spec.backend!r}; known backends: {', '.join(BACKENDS)}")

    def candidate(images: Tensor) -> Candidate:
        batch = images.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)  # (B, C, H, W)
        return lambda: runnable(batch)

    return candidate


# An engine's logits against the float32 model's, relative to the largest logit: TensorRT picks its own
# kernels (TF32 in fp32 on Ampere and later, half precision in fp16), so the bound is its precision's.
ENGINE_RTOL = {"fp32": 1e-2, "fp16": 3e-2}


@torch.inference_mode()
def _check_engine(model: nn.Module, runner: Callable[[Tensor], Candidate], example: Tensor, spec: RunnerSpec) -> None:
    """Raise when the engine's outputs differ from the model's (the runner is then reported as skipped, with why)."""
    reference = model(example)
    output = runner(example)()
    output = torch.as_tensor(output[0] if isinstance(output, list | tuple) else output).float().cpu()
    rel_err = max_errors(reference, output)[1]
    if not rel_err <= ENGINE_RTOL[spec.dtype]:
        raise ValueError(f"{spec.key} does not reproduce the model: {rel_err:.2e} relative error")


def ort_runner(session) -> Callable[[Tensor], Candidate]:
    """An onnxruntime session as a runner."""
    name = session.get_inputs()[0].name

    def ort_candidate(images: Tensor) -> Candidate:
        feed = {name: images.numpy()}  # on CUDA, each call copies it to the GPU and the logits back
        return lambda: session.run(None, feed)

    return ort_candidate


def array_runner(run: Callable[[np.ndarray], np.ndarray]) -> Callable[[Tensor], Candidate]:
    """A numpy-in, numpy-out engine (``litert.load``) as a runner."""

    def array_candidate(images: Tensor) -> Candidate:
        batch = images.numpy()  # (B, C, H, W) float32
        return lambda: run(batch)

    return array_candidate


def et_runner(run: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Candidate]:
    """An ExecuTorch program (:func:`repblocks.deploy.executorch.runner`) as a runner.

    A batch of more than one image is timed as one call per image (the ``.pte`` takes one: ``executorch.BATCH``).
    """

    def et_candidate(images: Tensor) -> Candidate:
        batch = images.float().contiguous()
        return lambda: run(batch)

    return et_candidate


def _providers(spec: RunnerSpec, device: torch.device) -> list | None:
    if spec.backend == "onnxruntime_trt":
        return [("TensorrtExecutionProvider", {"trt_fp16_enable": spec.dtype == "fp16"}), "CUDAExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
