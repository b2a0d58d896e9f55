"""What the time stage runs: a *runner* is one model through one backend in one dtype on one device.

Each backend belongs to one engine of :mod:`repblocks.deploy.engines` (``eager``, ``channels_last``
and ``compile`` to PyTorch, ``onnxruntime`` and ``onnxruntime_trt`` to onnxruntime, ``openvino`` and
``openvino_throughput`` to OpenVINO, ...), which says whether it can run here (:func:`applicable`: a
backend that cannot is listed as skipped, with the reason) and builds it (:func:`build_runner`).
Every runner has one calling convention (:class:`~repblocks.deploy.engines.base.Runner`);
:mod:`repblocks.deploy.speed` times them side by side. int8 runners come from ``quantize=int8``
(:func:`int8_runners`), already quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from repblocks.deploy.engines import BACKENDS, DEFAULT_BACKENDS, ENGINES, by_backend, by_name
from repblocks.deploy.engines.base import Int8Model, Runner, one_line

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKENDS",
    "RunnerSpec",
    "applicable",
    "build_runner",
    "int8_runners",
    "one_line",
]


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
    return by_backend(backend).load().applicable(backend, dtype, device)


def build_runner(
    model: nn.Module,
    spec: RunnerSpec,
    device: torch.device,
    workdir: Path | None,
    image_shape: tuple[int, int, int],
    *,
    max_batch: int = 128,
) -> Runner:
    """Prepare ``model`` for ``spec``; ``workdir`` holds the files of engines that run one (one folder per form)."""
    if spec.backend not in BACKENDS:
        raise ValueError(f"unknown backend {spec.backend!r}; known backends: {', '.join(BACKENDS)}")
    folder = None
    if workdir is not None:
        folder = Path(workdir) / spec.form.replace("/", "_")
        folder.mkdir(exist_ok=True)
    return (
        by_backend(spec.backend)
        .load()
        .runner(
            model, spec.backend, spec.dtype, device=device, workdir=folder, image_shape=image_shape, max_batch=max_batch
        )
    )


def int8_runners(
    passed: Mapping[str, Int8Model], *, device: torch.device, backends: Sequence[str]
) -> dict[RunnerSpec, Callable[[Path], Runner]]:
    """``{RunnerSpec: build(workdir) -> Runner}`` for the models that passed the gate, in the backends asked for.

    Each engine times what it can: the CPU engines their own int8 models on the CPU; on a GPU, TensorRT
    builds an int8 engine from onnxruntime's QDQ model. Then the reduced float precisions that passed
    (OpenVINO's bf16, fp16), each under its dtype, in the same rounds.
    """
    prepared = {}
    # The engines that quantized first, in quantize.engines' order (the report's int8 rows follow it); then
    # those that time another engine's int8 model (TensorRT, onnxruntime's).
    quantized = list(dict.fromkeys(gated.engine for gated in passed.values()))
    order = [by_name(name) for name in quantized] + [entry for entry in ENGINES if entry.name not in quantized]
    engines = [entry.load() for entry in order if any(backend in backends for backend in entry.backends)]
    for engine in engines:
        for backend, build in engine.int8_runners(passed, device=device, backends=backends).items():
            prepared[RunnerSpec("deploy", backend, "int8")] = build
    for engine in engines:
        for (backend, dtype), build in engine.low_precision_runners(passed, device=device, backends=backends).items():
            prepared[RunnerSpec("deploy", backend, dtype)] = build
    return prepared
