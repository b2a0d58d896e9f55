"""OpenVINO (extra ``[openvino]``): convert a deploy form, compile it for the CPU, save and check ``.xml``/``.bin``.

OpenVINO is optional: this module imports it only inside its functions, and :func:`missing`
says why it cannot be used (for the benchmark's list of skipped backends) where
:func:`require` stops a run that asked for it by name.

Two settings are always explicit, because their defaults change results or speed:

* ``INFERENCE_PRECISION_HINT=f32``: on CPUs with AVX-512 BF16 OpenVINO's default is bf16, which
  changes the outputs (the export check would fail) and, on a CPU without AMX, ran A0 1.8x
  slower than f32 here;
* ``PERFORMANCE_HINT``: ``LATENCY`` (one stream using every thread: the ``openvino`` backend) or
  ``THROUGHPUT`` (several streams sharing the threads, requests in flight together: the
  ``openvino_throughput`` backend, which splits each batch among them).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from repblocks.deploy.formats import dynamic_axes, openvino_installed
from repblocks.errors import UserError

__all__ = [
    "INSTALL",
    "compile_model",
    "infer",
    "installed",
    "load",
    "missing",
    "require",
    "runner",
    "save",
    "set_metadata",
    "to_openvino",
]

INSTALL = "pip install 'repblocks[openvino]'"
MODES = {"latency": "LATENCY", "throughput": "THROUGHPUT"}


def installed() -> bool:
    """Whether OpenVINO and NNCF can be imported, without importing them (what defaults are chosen by)."""
    return openvino_installed()


def missing() -> str | None:
    """Why OpenVINO and NNCF cannot be used here, or None when they can."""
    for package in ("openvino", "nncf"):
        try:
            __import__(package)
        except ImportError as err:
            return f"{package} is not installed ({INSTALL}): {err}"
    return None


def require(setting: str):
    """The ``openvino`` module; :class:`UserError` naming ``setting`` when it (or NNCF) is not installed."""
    reason = missing()
    if reason:
        raise UserError(f"{setting} needs OpenVINO, but {reason}")
    import openvino

    return openvino


def to_openvino(model: nn.Module, example: Tensor, *, dynamic_size: bool = False):
    """``model`` (float32, CPU, eval) as an ``openvino.Model`` with a dynamic batch axis, input ``images``, output ``logits``.

    Converted from a ``torch.export`` program, as the ONNX export is (OpenVINO's other path traces
    with TorchScript, which torch deprecates). ``dynamic_size``: height and width dynamic too, for
    a fully convolutional network timed at another size than it was exported at.
    """
    ov = require("the openvino backend")
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=(dynamic_axes(dynamic_size),))
        converted = ov.convert_model(program)
    converted.inputs[0].get_tensor().set_names({"images"})
    converted.outputs[0].get_tensor().set_names({"logits"})
    return converted


def set_metadata(ov_model, metadata: Mapping[str, str]) -> None:
    """Store ``metadata`` (model name, preprocessing, ...) in the model's runtime info, under ``repblocks``."""
    for key, value in metadata.items():
        ov_model.set_rt_info(value, ["repblocks", key])


def compile_model(ov_model, *, mode: str = "latency", threads: int | None = None):
    """Compile for the CPU in float32, in ``mode`` (``latency`` or ``throughput``), on ``threads`` threads (torch's)."""
    ov = require("the openvino backend")
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": MODES[mode],
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
    }
    return ov.Core().compile_model(ov_model, "CPU", config)


def infer(compiled) -> Callable[[Tensor], Tensor]:
    """``images (B, C, H, W) -> logits (B, classes)`` through one infer request of ``compiled``."""
    request = compiled.create_infer_request()

    def run(images: Tensor) -> Tensor:
        return torch.from_numpy(np.array(request.infer({0: images.numpy()})[0]))

    return run


def runner(ov_model, *, mode: str, threads: int | None = None) -> Callable[[Tensor], Callable[[], object]]:
    """For timing: a float32 CPU batch -> a zero-argument call that runs it (split among requests in throughput mode)."""
    compiled = compile_model(ov_model, mode=mode, threads=threads)
    if mode == "latency":
        request = compiled.create_infer_request()

        def latency_candidate(images: Tensor) -> Callable[[], object]:
            feed = {0: images.numpy()}
            return lambda: request.infer(feed)

        return latency_candidate
    ov = require("the openvino backend")
    queue = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def candidate(images: Tensor) -> Callable[[], object]:
        chunks = [chunk.numpy() for chunk in images.chunk(len(queue))]  # one request per chunk, run together

        def run() -> None:
            for chunk in chunks:
                queue.start_async({0: chunk})
            queue.wait_all()

        return run

    return candidate


def save(ov_model, path: str | Path) -> list[Path]:
    """Write ``path`` (``.xml``) and its ``.bin``, weights kept in their precision; return both paths.

    Both are written under temporary names and renamed, the ``.bin`` first: a ``.xml`` at the
    final name always has its whole ``.bin`` beside it, and a failure leaves neither.
    """
    ov = require("the openvino export")
    path = Path(path)
    weights = path.with_suffix(".bin")
    with _temporary_pair(path) as tmp:
        # compress_to_fp16 defaults to True: float32 weights would be rounded to fp16 on the way to disk.
        ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), weights)
        os.replace(tmp, path)
    return [path, weights]


def load(path: str | Path):
    """Read an ``.xml`` (and its ``.bin``) back as an ``openvino.Model``."""
    ov = require("reading an OpenVINO model")
    return ov.Core().read_model(str(path))


@contextlib.contextmanager
def _temporary_pair(path: Path) -> Iterator[Path]:
    """A hidden temporary ``.xml`` name beside ``path``; whatever is left of it and its ``.bin`` is removed after."""
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp.xml")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
