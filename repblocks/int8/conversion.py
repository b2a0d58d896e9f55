"""The torch -> OpenVINO conversion and the CPU compilation that int8 is measured with (extra ``[openvino]``).

OpenVINO and NNCF are imported inside the functions: :func:`missing` says why they cannot be used
here, :func:`require` stops a run that asked for them by name.

The example batch of a conversion holds at least two images (:func:`example_batch`):
``torch.export`` specializes an axis whose example size is 0 or 1, so an example of one image
would give a model whose batch axis is fixed at 1 (an error, since the axis is declared dynamic).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from repblocks.errors import UserError

__all__ = [
    "INSTALL",
    "compile_model",
    "core",
    "dynamic_axes",
    "example_batch",
    "infer",
    "missing",
    "record_precision",
    "recorded_precision",
    "require",
    "to_openvino",
]

INSTALL = "pip install 'repblocks[openvino]'"
MODES = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
# Where a model carries a runtime option for whoever compiles it (OpenVINO's rt_info convention; saved in the .xml).
PRECISION_KEY = ["runtime_options", "INFERENCE_PRECISION_HINT"]


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


def dynamic_axes(size: bool = False) -> dict:
    """``torch.export``'s dynamic shapes of an image batch: the batch axis, and height and width when ``size``."""
    axes = {0: torch.export.Dim("batch")}
    return {**axes, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO} if size else axes


def example_batch(images: Tensor) -> Tensor:
    """Two images of ``images`` ``(N, C, H, W)`` to convert with (the one image twice when ``N`` is 1)."""
    if len(images) == 0:
        raise ValueError("no example image to convert the model with")
    return images[:2] if len(images) >= 2 else images.expand(2, *images.shape[1:]).contiguous()


def to_openvino(model: nn.Module, example: Tensor, *, dynamic_size: bool = False):
    """``model`` (float32, CPU, eval) as an ``openvino.Model`` with a dynamic batch axis, input ``images``, output ``logits``.

    Converted from a ``torch.export`` program, as the ONNX export is. A model fake-quantized by NNCF
    goes through the TorchScript trace instead: NNCF's quantizers write themselves as
    ``FakeQuantize`` (what makes the IR int8) only while ``torch.jit`` traces them.
    ``dynamic_size``: height and width dynamic too, for a fully convolutional network run at
    another size than it was converted at.
    """
    ov = require("the openvino backend")
    example = example_batch(example)
    if _fake_quantized(model):
        converted = _traced(ov, model, example, dynamic_size=dynamic_size)
    else:
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=(dynamic_axes(dynamic_size),))
            converted = ov.convert_model(program)
    converted.inputs[0].get_tensor().set_names({"images"})
    converted.outputs[0].get_tensor().set_names({"logits"})
    return converted


def record_precision(ov_model, precision: str = "f32") -> None:
    """Record in ``ov_model`` the inference precision (``f32``, ``bf16``, ``f16``) it was verified at.

    Under ``runtime_options``, where OpenVINO keeps options for whoever compiles a model:
    :func:`compile_model` (so predict.py) compiles at it. OpenVINO's CPU plugin itself (2026.4) does
    not read this one: a plain ``compile_model(path, "CPU")`` picks bf16 on CPUs with AVX-512 BF16
    or AMX whatever the file says, which is why deploy's report gives that error too.
    """
    ov_model.set_rt_info(precision, PRECISION_KEY)


def recorded_precision(ov_model) -> str:
    """The inference precision :func:`record_precision` stored in ``ov_model``; ``f32`` when none was."""
    if not ov_model.has_rt_info(PRECISION_KEY):
        return "f32"
    return ov_model.get_rt_info(PRECISION_KEY).astype(str)


@functools.cache
def core():
    """The process's one ``openvino.Core``, kept until the process ends.

    Each Core's CPU plugin puts the calling thread on a signal stack of its own, and gives the one
    it found back when it is destroyed, if its own is still the current one. Two Cores that end in
    the order they began (the first compiled model dropped before the second: deploy does that) leave
    the thread on the first plugin's freed stack, and the next signal with a handler (Ctrl-C,
    torch's SIGCHLD handler of DataLoader workers) kills the process with SIGSEGV. One Core, never
    destroyed, keeps the thread on a stack that lives as long as the process.
    """
    return require("the openvino backend").Core()


def compile_model(ov_model, *, mode: str = "latency", threads: int | None = None):
    """Compile for the CPU at the model's recorded precision (float32 unless it records another), in ``mode``
    (``latency`` or ``throughput``), on ``threads`` threads (torch's).

    The precision is explicit: on CPUs with AVX-512 BF16 OpenVINO's default is bf16, which changes the
    outputs of what is not quantized.
    """
    config = {
        "INFERENCE_PRECISION_HINT": recorded_precision(ov_model),
        "PERFORMANCE_HINT": MODES[mode],
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
    }
    return core().compile_model(ov_model, "CPU", config)


def infer(compiled) -> Callable[[Tensor], Tensor]:
    """``images (B, C, H, W) -> logits (B, classes)`` through one infer request of ``compiled``."""
    request = compiled.create_infer_request()

    def run(images: Tensor) -> Tensor:
        # A copy: the request reuses its output buffer.
        return torch.from_numpy(np.array(request.infer({0: images.contiguous().numpy()})[0]))

    return run


def _fake_quantized(model: nn.Module) -> bool:
    """Whether NNCF put its quantizers into ``model`` (``nncf.quantize`` of a torch module)."""
    return any(type(module).__module__.startswith("nncf.") for module in model.modules())


def _traced(ov, model: nn.Module, example: Tensor, *, dynamic_size: bool):
    channels = example.shape[1]
    height, width = (-1, -1) if dynamic_size else example.shape[2:]
    with torch.no_grad(), warnings.catch_warnings():
        # The fake quantizers read their levels as Python numbers while traced: constants, as they should be.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=FutureWarning)
        return ov.convert_model(model.cpu().eval(), example_input=example, input=[(-1, channels, height, width)])
