"""TensorRT (extra ``[tensorrt]``, NVIDIA GPUs only): an engine built from the ONNX export, run on torch's CUDA stream.

``fp32`` and ``fp16`` engines are built from the float32 ONNX file (fp16 lets TensorRT pick half
precision kernels); ``int8`` ones from the QDQ ONNX file that ``quantize=int8`` wrote, so the
int8 scales are those calibrated on the run's own images (TensorRT's explicit quantization; its
implicit int8 calibrators are deprecated). The batch axis is dynamic up to the largest timed
batch. Input and output buffers are torch CUDA tensors: no copy between host and device is timed.
Each call returns the logits tensor, so the engine is checked against the model
(:func:`repblocks.deploy.engines.base.check_engine`) before it is timed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from repblocks.deploy.engines import onnxruntime
from repblocks.deploy.engines.base import Engine, Runner, check_engine

__all__ = ["ENGINE", "INSTALL", "missing", "runner"]

INSTALL = "pip install 'repblocks[tensorrt]'"


def missing(device: torch.device | None) -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    if device is None or device.type != "cuda":
        return "TensorRT runs on NVIDIA GPUs only; this run is on the CPU"
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        return f"tensorrt is not installed ({INSTALL}): {err}"
    return None


def runner(
    onnx_path: str | Path, *, dtype: str, image_shape: tuple[int, int, int], max_batch: int, device: torch.device
) -> Runner:
    """Build an engine for ``onnx_path``; timed with its input and output buffers on the GPU."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode TensorRT 10 has
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    if dtype == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif dtype == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # the QDQ nodes carry the scales
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (1, *image_shape), (max_batch, *image_shape), (max_batch, *image_shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build a {dtype} engine from {Path(onnx_path).name}")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    output = network.get_output(0).name

    def candidate(images: Tensor) -> Callable[[], object]:
        batch = images.to(device=device, dtype=torch.float32).contiguous()  # (B, C, H, W)
        context.set_input_shape(name, tuple(batch.shape))
        logits = torch.empty(tuple(context.get_tensor_shape(output)), device=device)  # (B, classes)
        context.set_tensor_address(name, batch.data_ptr())
        context.set_tensor_address(output, logits.data_ptr())
        stream = torch.cuda.current_stream(device).cuda_stream

        def run() -> torch.Tensor:
            context.execute_async_v3(stream)
            return logits

        return run

    def run(images: Tensor) -> Tensor:
        return candidate(images)().float().cpu()

    return Runner(run, candidate)


class TensorRT(Engine):
    name = "tensorrt"
    title = "TensorRT"
    backends = ("tensorrt",)

    def missing(self, device=None):
        return missing(device)

    def applicable(self, backend, dtype, device):
        return missing(device) or (None if dtype in ("fp32", "fp16") else "TensorRT builds fp32 and fp16 engines")

    def runner(self, model, backend, dtype, *, device, workdir, image_shape, max_batch=128):
        path = onnxruntime.timing_onnx(model, workdir, image_shape)
        built = runner(path, dtype=dtype, image_shape=image_shape, max_batch=max_batch, device=device)
        check_engine(model, built, torch.randn(2, *image_shape), dtype=dtype, what=f"tensorrt {dtype}")
        return built

    def int8_runners(self, passed, *, device, backends):
        """onnxruntime's QDQ model as a TensorRT int8 engine: the scales calibrated on the run's own images."""
        if "onnxruntime" not in passed or "tensorrt" not in backends or missing(device) is not None:
            return {}
        qdq = passed["onnxruntime"].model  # the QDQ ONNX file's bytes

        def build(workdir: Path) -> Runner:
            path = workdir / "int8.onnx"
            path.write_bytes(qdq)
            return runner(path, dtype="int8", image_shape=_input_shape(qdq), max_batch=128, device=device)

        return {"tensorrt": build}


def _input_shape(onnx_bytes: bytes) -> tuple[int, int, int]:
    import onnx

    dims = onnx.load_from_string(onnx_bytes).graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value for d in dims[1:])


ENGINE = TensorRT()
