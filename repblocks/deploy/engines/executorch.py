"""ExecuTorch (extra ``[executorch]``): a deploy form lowered to XNNPACK as a ``.pte``, fp32 or int8, run here too.

ExecuTorch is optional: it is imported only inside these functions, :func:`missing` says why it
cannot be used. The ``.pte`` is what a phone app loads (ExecuTorch's Android and iOS runtimes);
on Linux x86-64 its Python runtime runs the same file, which is how every export is checked and
how the ``executorch`` backend is timed.

* lowering (:func:`lower`): ``torch.export`` -> ``to_edge_transform_and_lower`` with the XNNPACK
  partitioner (every convolution, ReLU, pooling and the classifier go to XNNPACK; a ``view`` or two
  stay in ExecuTorch's portable kernels) -> ``to_executorch``. float32 throughout;
* the batch is fixed at one image (:data:`BATCH`), what a phone runs; the runners split a larger
  batch into calls of one. A dynamic batch axis lowers and runs, but is not reliable here
  (executorch 1.5.1): an int8 program that had run a batch of 8 then gave wrong logits for a
  batch of 3 (1.05 off, logits of about 0.85) where a fresh one did not; and XNNPACK's partitioner
  capped any declared bound above 15 at 15 images;
* int8 (:func:`quantize_int8`): PT2E post-training quantization with XNNPACK's quantizer
  (per-channel symmetric int8 weights, per-tensor asymmetric int8 activations whose ranges
  histogram observers choose), calibrated in torch and lowered the same way;
* the deploy metadata (model, classes, preprocessing: :func:`repblocks.run_checkpoint.deploy_metadata`)
  is inside the file, as the value of a constant method (:data:`METADATA_METHOD`) that returns one
  JSON string: :func:`read_metadata`;
* threads: ExecuTorch's CPU ops and XNNPACK share one process-wide thread pool, created at the
  first load with one thread per logical CPU (``cpuinfo``); :func:`runner` sets it to the count
  asked for (torch's, like onnxruntime's sessions), and resets it only when that count differs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from repblocks.deploy.engines.base import Engine, Int8Artifact, Runner, check_outputs, io_metadata
from repblocks.files import atomic_path
from repblocks.int8 import example_batch

__all__ = [
    "ENGINE",
    "INSTALL",
    "BATCH",
    "METADATA_METHOD",
    "load",
    "lower",
    "missing",
    "quantize_int8",
    "read_metadata",
    "runner",
    "set_threads",
    "version",
]

log = logging.getLogger(__name__)

INSTALL = "pip install 'repblocks[executorch]'"
BATCH = 1  # the batch a .pte takes (see above); a phone runs 1
CALIBRATION_BATCH = 32  # images per call of the observed model while calibrating int8 (in torch)
METADATA_METHOD = "repblocks_metadata"  # a constant method of the .pte: the deploy metadata as one JSON string


def missing() -> str | None:
    """Why ExecuTorch cannot be used here, or None when it can (without importing it)."""
    for package in ("executorch", "torchao"):  # torchao: the PT2E quantization that int8 uses
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # an import hook that refuses the name
            found = False
        if not found:
            return f"{package} is not installed ({INSTALL})"
    return None


def version() -> str:
    """``"executorch 1.5.1"``."""
    from importlib.metadata import version as package_version

    return f"executorch {package_version('executorch')}"


def lower(model: nn.Module, example: Tensor, *, metadata: Mapping[str, str] | None = None) -> bytes:
    """``model`` (float32, CPU, eval, or PT2E-quantized) lowered to XNNPACK: the ``.pte`` file's bytes.

    Args:
        example: Images ``(N, C, H, W)`` at the size the program takes; :data:`BATCH` of them are traced.
        metadata: Strings stored in the program (:data:`METADATA_METHOD`).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        program = torch.export.export(model, (example[:BATCH].contiguous(),))
        edge = to_edge_transform_and_lower(
            program,
            partitioner=[XnnpackPartitioner()],
            constant_methods={METADATA_METHOD: json.dumps(dict(metadata))} if metadata else None,
        )
        return bytes(edge.to_executorch().buffer)


def quantize_int8(model: nn.Module, calibration: Tensor, *, metadata: Mapping[str, str] | None = None) -> bytes:
    """``model`` quantized by PT2E with XNNPACK's quantizer, calibrated on ``calibration`` ``(N, C, H, W)``; the ``.pte``.

    Weights: int8, symmetric, one scale per output channel (RepVGG's fused kernels have channels
    whose ranges lie far apart); activations: int8, one scale and zero point per tensor.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    with torch.no_grad():
        # Calibrated a batch at a time (a dynamic batch axis, in torch), then lowered at the file's batch.
        batch_axis = {0: torch.export.Dim("batch", min=1, max=CALIBRATION_BATCH)}
        graph = torch.export.export(model, (example_batch(calibration),), dynamic_shapes=(batch_axis,)).module()
        observed = prepare_pt2e(graph, quantizer)
        for batch in calibration.split(CALIBRATION_BATCH):
            observed(batch.contiguous())
        quantized = convert_pt2e(observed)
    return lower(quantized, calibration, metadata=metadata)


def set_threads(count: int) -> None:
    """Run ExecuTorch's CPU thread pool (shared by every program in this process) on ``count`` threads."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != count:
        # "unsafe": it must not run while a program is executing; a runner calls it before any call of its own.
        portable_lib._unsafe_reset_threadpool(count)


def _program(source: bytes | Path, name: str):
    """ExecuTorch's ``Program`` of ``source`` (a file or its bytes); ValueError in one line when it is not one."""
    from executorch.runtime import Runtime

    data = source.read_bytes() if isinstance(source, Path) else source
    try:
        return Runtime.get().load_program(data)
    except RuntimeError as err:  # its only exception type; what failed went to stderr from C++
        raise ValueError(f"{name} is not an ExecuTorch program (.pte), or it is truncated ({err})") from None


def runner(
    source: bytes | str | Path, *, threads: int | None = None, name: str | None = None
) -> Callable[[Tensor], Tensor]:
    """``source`` (a ``.pte`` file or its bytes) run by ExecuTorch: images ``(B, C, H, W)`` -> logits ``(B, classes)``.

    Any batch size: batches larger than the program's planned batch are split into calls of that size.

    Raises:
        ValueError: ``source`` is not a ``.pte``; at a call, images of another shape than the program's.
    """
    source = source if isinstance(source, bytes) else Path(source)
    name = name or (source.name if isinstance(source, Path) else "the ExecuTorch program")
    program = _program(source, name)
    set_threads(threads or torch.get_num_threads())
    try:
        method = program.load_method("forward")
        sizes = tuple(method.metadata.input_tensor_meta(0).sizes())  # (planned batch, C, H, W)
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"{name} has no runnable forward method ({err})") from None
    planned, image_shape = sizes[0], sizes[1:]

    def run(images: Tensor) -> Tensor:
        if tuple(images.shape[1:]) != image_shape:
            got = "x".join(map(str, images.shape[1:]))
            raise ValueError(f"{name} takes images of {'x'.join(map(str, image_shape))}, got {got}")
        images = images.float().contiguous()
        # program: the method points into the program's memory, which must outlive it.
        return torch.cat([program.load_method("forward").execute([chunk])[0] for chunk in images.split(planned)])

    run.planned_batch = planned
    run.image_shape = image_shape
    return run


def load(path: str | Path, *, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``path`` run by ExecuTorch: float32 images ``(B, C, H, W)`` -> float32 logits ``(B, classes)``, as numpy.

    Raises:
        ValueError: ``path`` is not a ``.pte`` (or is truncated), or a call's images have another shape.
    """
    run = runner(Path(path), threads=threads)
    return lambda images: run(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()


def read_metadata(path: str | Path) -> dict[str, str]:
    """The deploy metadata inside ``path`` (model, classes, preprocessing, ...), as ``{key: string}``.

    Raises:
        ValueError: ``path`` is not a ``.pte``, or holds no metadata of deploy.py's.
    """
    path = Path(path)
    program = _program(path, path.name)
    if METADATA_METHOD not in program.method_names:
        raise ValueError(
            f"{path.name} holds no repblocks metadata (no {METADATA_METHOD} method): not a deploy.py export"
        )
    try:
        (value,) = program.load_method(METADATA_METHOD).execute([])
        metadata = json.loads(value)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"{path.name}: its {METADATA_METHOD} is not a JSON string ({err})") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in [*metadata, *metadata.values()]):
        raise ValueError(f"{path.name}: its {METADATA_METHOD} is not a mapping of strings to strings")
    return metadata


def _write_pte(program: bytes, path: Path, reference, example: Tensor, check) -> dict:
    """Write ``program`` at ``path`` once ExecuTorch, reading the file back, reproduces ``reference``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(program)
        run = runner(tmp, name=path.name)
        errors = check_outputs(reference, run, example, check=check, what=f"ExecuTorch reading {path.name}")
    return {**errors, "runtime": version(), "max_batch": run.planned_batch}


def _as_runner(run: Callable[[Tensor], Tensor], metadata: dict[str, str] | None = None) -> Runner:
    def bind(images: Tensor) -> Callable[[], object]:
        batch = images.float().contiguous()  # a batch of more than one image: one call per image (BATCH)
        return lambda: run(batch)

    return Runner(run, bind, metadata=metadata or {}, max_batch=getattr(run, "planned_batch", None))


def _int8_run(program: bytes) -> Callable[[Tensor], Tensor]:
    return runner(program, name="the int8 ExecuTorch program")


class ExecuTorch(Engine):
    name = "executorch"
    title = "ExecuTorch"
    backends = ("executorch",)

    def missing(self, device=None):
        return missing()

    def applicable(self, backend, dtype, device):
        if device.type != "cpu":
            return "ExecuTorch's XNNPACK backend is timed on the CPU; this run times the GPU"
        return missing() or (None if dtype == "fp32" else "the ExecuTorch export is float32")

    def export(self, model, path, example, metadata, *, check, precision="fp32"):
        metadata = {**metadata, **io_metadata(tuple(example.shape[1:]))}  # what a phone app feeds it: NCHW float32
        info = _write_pte(lower(model, example, metadata=metadata), Path(path), model, example, check)
        return {"path": str(path), "format": "executorch", **info}

    def read_metadata(self, path):
        return read_metadata(path)

    def open(self, path, threads, *, precision=None):
        metadata = read_metadata(path)
        return _as_runner(runner(Path(path), threads=threads), metadata)

    def runner(self, model, backend, dtype, *, device, workdir, image_shape, max_batch=128):
        return _as_runner(runner(lower(model, torch.randn(2, *image_shape))))

    def int8(self, model, calibration, *, metadata, worst_layers=0):
        # The .pte carries its metadata inside: it goes in when lowered, so the program gated is the file written.
        metadata = {**metadata, **io_metadata(tuple(calibration.shape[1:]))} if metadata else metadata
        program = quantize_int8(model, calibration, metadata=metadata)
        method = "PT2E XNNPACKQuantizer (per-channel weights), ExecuTorch XNNPACK"
        return Int8Artifact(method, program, _int8_run(program))

    def write_int8(self, int8, path, metadata, example, *, check):
        return _write_pte(int8.model, Path(path), int8.run, example, check)

    def int8_runners(self, passed, *, device, backends):
        if "executorch" not in passed or device.type != "cpu" or "executorch" not in backends:
            return {}
        program = passed["executorch"].model  # the .pte's bytes
        return {"executorch": lambda _: _as_runner(runner(program))}


ENGINE = ExecuTorch()
