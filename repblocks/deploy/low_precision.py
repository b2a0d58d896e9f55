"""bf16 and fp16 deploy files for OpenVINO on the CPU, gated on accuracy as int8 is, and what a plain compile gives.

With ``quantize=int8`` and ``quantize.floats=[bf16, fp16]`` (the preset's default), each precision the
CPU runs natively is judged by int8's gate (:class:`repblocks.deploy.quantize.Gate`: top-1 on the
validation images, at most ``quantize.max_drop`` points below fp32), written as ``model_bf16.xml``
(``model_fp16.xml``) only if it passes, and timed beside fp32 and int8 in the same interleaved run.
A precision the CPU lacks is skipped with the reason, from OpenVINO's own capability query
(``OPTIMIZATION_CAPABILITIES``: ``BF16`` with AVX-512 BF16 or AMX, ``FP16`` with AVX-512 FP16 or AMX-FP16).

Each file records the precision it was verified at (:func:`repblocks.int8.openvino.record_precision`),
which predict.py compiles at. OpenVINO's CPU plugin (2026.4) does not read that record: a plain
``openvino.Core().compile_model(path, "CPU")`` runs in bf16 on a CPU with bf16, whatever the file
says. So every OpenVINO file's check also compiles it so, with no setting, and the report gives
that precision and its error (:func:`plain_runtime`): what a user of the bare runtime gets.

onnxruntime has no bf16 or fp16 convolution on x86 CPUs (its CPU provider casts fp16 models back to
float32, or refuses them): it is not offered here.

This module imports neither ``quantize`` nor ``export``, which call it: the gate and the writer are
passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from repblocks.deploy import openvino
from repblocks.int8.openvino import record_precision, recorded_precision
from repblocks.numerics import max_errors, within_tolerance

__all__ = [
    "FILE_NAMES",
    "PRECISIONS",
    "cpu_missing",
    "engine",
    "gate_floats",
    "plain_runtime",
    "precision_of",
    "timed_models",
    "write",
]

log = logging.getLogger(__name__)

# deploy's name -> (OpenVINO's element type, the CPU capability OpenVINO reports when it runs it natively)
PRECISIONS = {"bf16": ("bf16", "BF16"), "fp16": ("f16", "FP16")}
FILE_NAMES = {"bf16": "model_bf16.xml", "fp16": "model_fp16.xml"}
CHECK_BATCH_SIZES = (1, 3)  # as the fp32 export's check: neither is the conversion's example batch


def engine(precision: str) -> str:
    """The name a gated float model goes by among the int8 engines: ``openvino_bf16``."""
    return f"openvino_{precision}"


def precision_of(engine_name: str) -> str | None:
    """``bf16`` for ``openvino_bf16``; None for an int8 engine."""
    prefix, _, precision = engine_name.partition("_")
    return precision if prefix == "openvino" and precision in PRECISIONS else None


def cpu_missing(precision: str) -> str | None:
    """Why OpenVINO cannot run ``precision`` natively on this CPU, or None when it can."""
    reason = openvino.missing()
    if reason:
        return reason
    ov = openvino.require(f"{precision} inference")
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    needed = PRECISIONS[precision][1]
    if needed not in capabilities:
        return (
            f"this CPU has no native {precision} (OpenVINO's CPU capabilities: {', '.join(capabilities)}); "
            f"emulated it would be slower than fp32"
        )
    return None


def gate_floats(
    plain: nn.Module, calibration: Tensor, gate, precisions: Sequence[str]
) -> tuple[dict[str, object], list[dict]]:
    """Each of ``precisions`` the CPU runs, converted, compiled at that precision and judged by ``gate``.

    Args:
        gate: int8's :class:`~repblocks.deploy.quantize.Gate`; its ``judge`` gives the result.

    Returns:
        ``{engine name: gate result}``, and the precisions skipped with the reason.
    """
    results, skipped = {}, []
    for precision in dict.fromkeys(precisions):
        reason = cpu_missing(precision)
        if reason:
            log.info("%s: skipped: %s", precision, reason)
            skipped.append({"what": f"openvino {precision}", "reason": reason})
            continue
        ov_model = openvino.to_openvino(plain, calibration, dynamic_size=True)
        record_precision(ov_model, PRECISIONS[precision][0])
        run = openvino.infer(openvino.compile_model(ov_model))
        method = f"OpenVINO CPU at inference precision {precision} (weights stored in fp32)"
        results[engine(precision)] = gate.judge(engine(precision), method, ov_model, run)
    return results, skipped


def write(
    ov_model,
    path: Path,
    metadata: dict[str, str],
    gated: Callable[[Tensor], Tensor],
    example: Tensor,
    *,
    atol: float,
    rtol: float,
) -> dict:
    """Save a gated float model with ``metadata``; read it back as predict.py does, and compare with what was gated.

    Returns:
        What the export stage records: runtime, errors against the gated model, and the plain compile's.

    Raises:
        ValueError: The file, compiled at its recorded precision, does not reproduce the gated model.
    """
    openvino.set_metadata(ov_model, metadata)
    openvino.save(ov_model, path)
    reloaded = openvino.load(path)
    precision = recorded_precision(reloaded)
    run = openvino.infer(openvino.compile_model(reloaded))
    worst_abs, worst_rel = _errors(gated, run, example)
    if not within_tolerance(worst_abs, worst_rel, atol=atol, rtol=rtol):  # same graph, same precision
        raise ValueError(
            f"OpenVINO reading {path.name} at {precision} does not reproduce the gated model: max error {worst_abs:.2e}"
        )
    return {
        "format": f"openvino {precision}",
        "check": f"read back, compiled at its recorded {precision}: outputs equal to the gated model's",
        "max_abs_err": worst_abs,
        "max_rel_err": worst_rel,
        "checked_batch_sizes": list(CHECK_BATCH_SIZES),
    }


def plain_runtime(path: str | Path, reference: Callable[[Tensor], Tensor], example: Tensor) -> dict:
    """What ``openvino.Core().compile_model(path, "CPU")``, with no setting, runs at and its error against ``reference``.

    The precision is the compiled model's own answer (``INFERENCE_PRECISION_HINT``), so it holds on any CPU.
    """
    ov = openvino.require("checking an OpenVINO file")
    compiled = ov.Core().compile_model(str(path), "CPU")
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
    worst_abs, worst_rel = _errors(reference, openvino.infer(compiled), example)
    return {"precision": precision, "max_abs_err": worst_abs, "max_rel_err": worst_rel}


def timed_models(models: dict[str, object], *, backends: Sequence[str]) -> dict[tuple[str, str], object]:
    """``{(backend, precision): openvino.Model}`` of the gated float models that passed, for the OpenVINO backends asked for."""
    timed = {}
    for name, result in models.items():
        precision = precision_of(name)
        for backend in ("openvino", "openvino_throughput"):
            if precision and result.passed and backend in backends:
                timed[backend, precision] = result.model
    return timed


def _errors(reference: Callable[[Tensor], Tensor], run: Callable[[Tensor], Tensor], example: Tensor):
    worst_abs, worst_rel = 0.0, 0.0
    with torch.inference_mode():
        for batch_size in CHECK_BATCH_SIZES:
            images = torch.randn(batch_size, *example.shape[1:], generator=torch.Generator().manual_seed(batch_size))
            abs_err, rel_err = max_errors(reference(images), torch.as_tensor(np.asarray(run(images))))
            worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
    return worst_abs, worst_rel
