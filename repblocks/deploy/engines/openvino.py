"""OpenVINO (extra ``[openvino]``): ``model.xml``/``.bin``, ``model_int8.xml`` (NNCF) and the gated
``model_bf16.xml``/``model_fp16.xml``, timed on the CPU.

OpenVINO is optional: this module imports it only inside its functions, and :func:`missing`
says why it cannot be used (for the benchmark's list of skipped backends) where
:func:`require` stops a run that asked for it by name. The conversion and the compilation are
:mod:`repblocks.int8.conversion`'s, shared with QAT; this module adds files, int8 (NNCF's post-training
quantization, and its accuracy control when that fails the gate), predict's runner and timing.

Two settings are always explicit, because their defaults change results or speed:

* ``INFERENCE_PRECISION_HINT``, the precision a file records (f32 but for the gated bf16/fp16): on
  CPUs with AVX-512 BF16 OpenVINO's default is bf16, which changes the outputs (the export check
  would fail) and, on a CPU without AMX, ran A0 1.8x slower than f32 here;
* ``PERFORMANCE_HINT``: ``LATENCY`` (one stream using every thread: the ``openvino`` backend) or
  ``THROUGHPUT`` (several streams sharing the threads, requests in flight together: the
  ``openvino_throughput`` backend, which splits each batch among them).

Each file records the inference precision it was verified at (:func:`record_precision`: f32 for
``model.xml`` and ``model_int8.xml``), which :func:`compile_model`, so predict.py, compiles at.
OpenVINO's CPU plugin (2026.4) does not read that record: a plain ``openvino.Core().compile_model(path,
"CPU")`` runs in bf16 on a CPU with bf16, whatever the file says. So every file's check also compiles
it so, with no setting, and the export record gives that precision and its error
(:func:`plain_runtime`): what a user of the bare runtime gets.

bf16 and fp16 (``quantize.floats``) are judged by int8's gate and written only if they pass, each
only where the CPU runs it natively, from OpenVINO's own capability query (``OPTIMIZATION_CAPABILITIES``:
``BF16`` with AVX-512 BF16 or AMX, ``FP16`` with AVX-512 FP16 or AMX-FP16); elsewhere emulated, they
would be slower than f32, and are skipped with the reason. onnxruntime has no bf16 or fp16
convolution on x86 CPUs (its CPU provider casts fp16 models back to float32, or refuses them), so it
offers none.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from repblocks.deploy.engines.base import Engine, Int8Artifact, Runner, check_outputs, output_errors
from repblocks.errors import UserError

# One conversion and one compilation for fp32 and int8, deployment and QAT: they live in the int8 package.
from repblocks.int8 import NNCF_OPTIONS, nncf_dataset, nncf_int8, top1
from repblocks.int8.conversion import (
    INSTALL,
    compile_model,
    core,
    infer,
    missing,
    record_precision,
    recorded_precision,
    require,
    to_openvino,
)

__all__ = [
    "ENGINE",
    "INSTALL",
    "compile_model",
    "core",
    "infer",
    "load",
    "missing",
    "plain_runtime",
    "read_metadata",
    "record_precision",
    "recorded_precision",
    "require",
    "runner",
    "save",
    "set_metadata",
    "to_openvino",
]


MODES = {"openvino": "latency", "openvino_throughput": "throughput"}  # timing backend -> performance hint
# deploy's name -> (OpenVINO's element type, the CPU capability OpenVINO reports when it runs it natively)
PRECISIONS = {"fp32": ("f32", None), "bf16": ("bf16", "BF16"), "fp16": ("f16", "FP16")}


def set_metadata(ov_model, metadata: Mapping[str, str]) -> None:
    """Store ``metadata`` (model name, preprocessing, ...) in the model's runtime info, under ``repblocks``."""
    for key, value in metadata.items():
        ov_model.set_rt_info(value, ["repblocks", key])


def read_metadata(ov_model) -> dict[str, str]:
    """What :func:`set_metadata` stored in the model's runtime info, as strings (``{}`` when there is none)."""
    if not ov_model.has_rt_info(["repblocks"]):
        return {}
    entries = ov_model.get_rt_info(["repblocks"]).astype(dict)
    return {str(key): value.astype(str) for key, value in entries.items()}


def runner(ov_model, *, mode: str = "latency", threads: int | None = None) -> Runner:
    """``ov_model`` compiled for the CPU at its recorded precision (float32 unless gated bf16/fp16); timed split
    among requests in throughput mode."""
    compiled = compile_model(ov_model, mode=mode, threads=threads)
    run = infer(compiled)
    if mode == "latency":
        request = compiled.create_infer_request()

        def latency_candidate(images: Tensor) -> Callable[[], object]:
            feed = {0: images.numpy()}
            return lambda: request.infer(feed)

        return Runner(run, latency_candidate)
    ov = require("the openvino backend")
    queue = ov.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def candidate(images: Tensor) -> Callable[[], object]:
        chunks = [chunk.numpy() for chunk in images.chunk(len(queue))]  # one request per chunk, run together

        def run() -> None:
            for chunk in chunks:
                queue.start_async({0: chunk})
            queue.wait_all()

        return run

    return Runner(run, candidate)


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
    require("reading an OpenVINO model")
    return core().read_model(str(path))


@contextlib.contextmanager
def _temporary_pair(path: Path) -> Iterator[Path]:
    """A hidden temporary ``.xml`` name beside ``path``; whatever is left of it and its ``.bin`` is removed after."""
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp.xml")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)


def _write(
    ov_model, path: Path, metadata: Mapping[str, str], reference, example: Tensor, check, what: str,
    *, precision: str = "fp32",
) -> dict:  # fmt: skip
    """Save ``ov_model`` with ``metadata`` and ``precision`` recorded at ``path``; OpenVINO, compiling the files
    read back at the recorded precision, must reproduce ``reference``. The record has a plain compile's too."""
    set_metadata(ov_model, metadata)
    record_precision(ov_model, PRECISIONS[precision][0])  # the precision it is verified at, in the file
    written = save(ov_model, path)
    try:
        reloaded = infer(compile_model(load(path)))
        errors = check_outputs(reference, reloaded, example, check=check, what=what)
        errors["plain_runtime"] = plain_runtime(path, reference, example)
    except BaseException:
        for file in written:
            file.unlink(missing_ok=True)
        raise
    return {"path": str(path), "runtime": version(), **errors}


def plain_runtime(path: str | Path, reference: Callable[[Tensor], Tensor], example: Tensor) -> dict:
    """What ``openvino.Core().compile_model(path, "CPU")``, with no setting, runs at and its error against ``reference``.

    The precision is the compiled model's own answer (``INFERENCE_PRECISION_HINT``), so it holds on any CPU.
    """
    require("checking an OpenVINO file")
    compiled = core().compile_model(str(path), "CPU")  # the plain call, on our one Core (int8.conversion.core)
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
    worst_abs, worst_rel = output_errors(reference, infer(compiled), example)
    return {"precision": precision, "max_abs_err": worst_abs, "max_rel_err": worst_rel}


def version() -> str:
    from importlib.metadata import version as package_version

    return f"openvino {package_version('openvino')}"


class OpenVINO(Engine):
    name = "openvino"
    title = "OpenVINO"
    backends = tuple(MODES)

    def missing(self, device=None):
        return missing()

    def export(self, model, path, example, metadata, *, check, precision="fp32"):
        info = _write(to_openvino(model, example), Path(path), metadata, model, example, check,
                      "OpenVINO (fp32 precision hint)")  # fmt: skip
        return {**info, "format": "openvino"}  # model.xml: f32 recorded

    def read_metadata(self, path):
        return read_metadata(load(path))

    def open(self, path, threads, *, precision=None):
        require(f"predicting with {Path(path).name}")
        try:
            model = load(path)
        except Exception as err:  # OpenVINO's RuntimeError: not IR, no .bin beside it, truncated
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise UserError(f"OpenVINO cannot read {path} (and its .bin): {(lines or [''])[0][:300]}") from None
        return Runner(infer(compile_model(model, threads=threads)), metadata=read_metadata(model))

    def applicable(self, backend, dtype, device):
        if device.type != "cpu":
            return "OpenVINO is timed on the CPU; this run times the GPU"
        if missing() or dtype == "fp32":
            return missing()
        return f"OpenVINO is timed here in fp32; its {dtype} is gated and timed with quantize.floats"

    def runner(self, model, backend, dtype, *, device, workdir, image_shape, max_batch=128):
        return runner(to_openvino(model, torch.randn(2, *image_shape)), mode=MODES[backend])

    def int8(self, model, calibration, *, metadata, worst_layers=0):
        quantized = nncf_int8(model, calibration)
        return Int8Artifact("NNCF post-training (bias correction), OpenVINO", quantized, _run(quantized))

    def int8_with_accuracy_control(self, model, calibration, batches, *, max_drop: float) -> Int8Artifact:
        """NNCF's accuracy control: the convolutions that cost most top-1 on ``batches`` are kept in fp32."""
        import nncf

        def validate(compiled, items) -> float:  # NNCF's drop is a fraction, ours in points
            logits = torch.cat([torch.from_numpy(np.array(compiled(images.numpy())[0])) for images, _ in items])
            return top1(logits, torch.cat([labels for _, labels in items])) / 100

        controlled = nncf.quantize_with_accuracy_control(
            to_openvino(model, calibration, dynamic_size=True),
            nncf_dataset(calibration),
            nncf.Dataset(batches, lambda batch: batch[0].numpy()),  # items (images, labels); the model reads images
            validate,
            max_drop=max_drop / 100,
            subset_size=len(calibration),
            **NNCF_OPTIONS,
        )
        kept = [
            op.get_friendly_name()
            for op in controlled.get_ops()
            if op.get_type_name() == "Convolution" and not _quantized(op)
        ]
        method = f"NNCF accuracy control, OpenVINO ({len(kept)} convolutions kept in fp32)"
        return Int8Artifact(method, controlled, _run(controlled), fp32_layers=kept)

    def write_int8(self, int8, path, metadata, example, *, check):
        return _write(int8.model, Path(path), metadata, int8.run, example, check, f"OpenVINO reading {Path(path).name}")

    def int8_runners(self, passed, *, device, backends):
        if "openvino" not in passed or device.type != "cpu":
            return {}
        model = passed["openvino"].model
        return {backend: (lambda _, mode=mode: runner(model, mode=mode)) for backend, mode in MODES.items()
                if backend in backends}  # fmt: skip

    def float_missing(self, precision):
        reason = missing()
        if reason:
            return reason
        require(f"{precision} inference")
        capabilities = core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if PRECISIONS[precision][1] not in capabilities:
            return (
                f"this CPU has no native {precision} (OpenVINO's CPU capabilities: {', '.join(capabilities)}); "
                "emulated it would be slower than fp32"
            )
        return None

    def low_precision(self, model, calibration, precision):
        ov_model = to_openvino(model, calibration, dynamic_size=True)
        record_precision(ov_model, PRECISIONS[precision][0])  # compile_model compiles at it
        method = f"OpenVINO CPU at inference precision {precision} (weights stored in fp32)"
        return Int8Artifact(method, ov_model, _run(ov_model))

    def write_low_precision(self, gated, path, metadata, example, *, check):
        path = Path(path)
        what = f"OpenVINO reading {path.name} at {gated.precision}"
        info = _write(gated.model, path, metadata, gated.run, example, check, what, precision=gated.precision)
        type_name = PRECISIONS[gated.precision][0]
        return {**info, "format": f"openvino {type_name}",
                "check": f"read back, compiled at its recorded {type_name}: outputs equal to the gated model's"}  # fmt: skip

    def low_precision_runners(self, passed, *, device, backends):
        if device.type != "cpu":
            return {}
        return {(backend, gated.precision): (lambda _, m=gated.model, mode=mode: runner(m, mode=mode))
                for gated in passed.values() if gated.engine == self.name and gated.precision != "int8"
                for backend, mode in MODES.items() if backend in backends}  # fmt: skip


def _run(ov_model) -> Callable[[Tensor], Tensor]:
    return infer(compile_model(ov_model))


def _quantized(op) -> bool:
    """Whether a convolution's weights come through a FakeQuantize or an int8 constant: NNCF quantized it."""
    weights = op.input(1).get_source_output().get_node()
    while weights.get_type_name() in ("Convert", "Multiply", "Subtract", "Reshape"):
        weights = weights.input(0).get_source_output().get_node()
    precision = weights.get_output_element_type(0).get_type_name()
    return weights.get_type_name() in ("FakeQuantize", "FakeConvert") or precision in ("i8", "u8")


ENGINE = OpenVINO()
