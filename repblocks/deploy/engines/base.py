"""The protocol every engine implements, and the records it hands to the pipeline's stages.

An engine (``onnxruntime``, ``openvino``, ``executorch``, ...) is one module of this package with one
:class:`Engine` subclass, listed once in the registry (:mod:`repblocks.deploy.engines`). What it does:

* :meth:`Engine.missing`: why it cannot run here (its package not installed, no compiler), in one
  line, or None;
* :meth:`Engine.export`: write a model to its file in a precision (and in ``check.layout``, where the
  engine offers a choice of input layout: LiteRT), read the file back with the
  engine's own runtime in the precision that runtime will use, and check it against the model
  (:func:`check_outputs`); the file takes its final name only once checked. The record is an
  :class:`Export`;
* :meth:`Engine.open`: a file it wrote as a :class:`Runner`, the one calling convention of every
  engine: float32 images ``(B, C, H, W)`` -> float32 logits ``(B, classes)``, CPU torch tensors;
* :meth:`Engine.runner`: the same for a model in memory, for timing (one per timing backend);
* optionally int8 (:meth:`Engine.int8`, :meth:`Engine.write_int8`, :meth:`Engine.int8_runner`): a
  quantized model the accuracy gate (:mod:`repblocks.deploy.quantize`) judges, then writes and times;
* optionally reduced float precisions judged by the same gate (the registry's ``floats``: OpenVINO's
  bf16 and fp16; :meth:`Engine.float_missing`, :meth:`Engine.low_precision`,
  :meth:`Engine.write_low_precision`, :meth:`Engine.low_precision_runners`), written to the registry's
  file for that precision only when they pass. A reduced precision that is exported ungated (Core ML's
  fp16 package) goes through :meth:`Engine.export` with ``precision=`` instead.

The guarantees made once for every engine belong in each engine's ``export`` and ``open``, the only two
places its runtime reads a file: the file is verified in the precision its runtime will use
(``export`` checks it as ``open`` runs it: OpenVINO with the f32 hint, a bf16/fp16 file through
``open(precision=...)``), an output never replaces an input (the atomic writes of :mod:`repblocks.files`),
nothing is sent over the network (:func:`repblocks.offline.disable_telemetry`, the one place the
switches are set, runs when :mod:`repblocks.deploy`, the package of every engine module, is imported,
and first thing in deploy.py and predict.py: before any runtime is imported, as onnxruntime reads its
switch once, on import), and the runtime's own log lines stay out of the user's terminal: the Python
ones by each engine's quiet context (LiteRT's, Core ML's, AOTInductor's), the C++ ones (ExecuTorch's
cpuinfo lines, absl's, TensorFlow's oneDNN note, LiteRT's XNNPACK delegate line) by
:func:`runtime_output`, around every stage that runs an engine (:mod:`repblocks.deploy.pipeline`)
and around predict's opening and running of a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from repblocks.errors import OutputMismatch
from repblocks.numerics import max_errors, within_tolerance

__all__ = [
    "CHECK_BATCH_SIZES",
    "LAYOUTS",
    "RUNTIME_LOGS",
    "Check",
    "Engine",
    "Export",
    "Int8Artifact",
    "Int8Model",
    "Runner",
    "check_engine",
    "check_outputs",
    "io_metadata",
    "one_line",
    "output_errors",
    "runtime_output",
]

log = logging.getLogger(__name__)

CHECK_BATCH_SIZES = (1, 3)  # neither is the export's example batch (2): the batch axis must really be dynamic
Logits = Callable[[Tensor], Tensor]  # images (B, C, H, W) float32 -> logits (B, classes)
RUNTIME_LOGS = "REPBLOCKS_RUNTIME_LOGS"  # =1: the runtimes' own lines reach stderr as they write them


@contextlib.contextmanager
def runtime_output(what: str) -> Iterator[None]:
    """Inside, what is written to the process's stderr is kept aside; shown in the log only if ``what`` fails.

    The inference runtimes write their notes from C++ straight to file descriptor 2 (ExecuTorch's
    cpuinfo lines, absl's, TensorFlow's oneDNN note, "INFO: Created TensorFlow Lite XNNPACK delegate"),
    past ``sys.stderr``, so descriptor 2 itself points at an unnamed temporary file inside; the log's
    own handlers on stderr keep writing to the terminal. An error raised inside logs what was kept (a
    warning), then goes on; an interrupt does not (its one line says enough).
    ``REPBLOCKS_RUNTIME_LOGS=1`` in the environment lets everything through as written.

    Args:
        what: What runs inside, for the log (``"the export stage"``).
    """
    if os.environ.get(RUNTIME_LOGS, "").strip().lower() in ("1", "true", "yes", "on"):
        yield
        return
    with tempfile.TemporaryFile() as kept:
        _flush_stderr()
        saved = os.dup(2)
        os.dup2(kept.fileno(), 2)
        try:
            # Our own log lines are not the runtimes': the log's handlers on stderr keep writing to the terminal.
            with (
                open(saved, "w", buffering=1, closefd=False, errors="backslashreplace") as stderr,
                _log_handlers_writing_to(stderr),
            ):
                yield
        except Exception:
            _restore_stderr(saved)
            saved = None
            kept.seek(0)
            written = kept.read().decode(errors="replace").strip()
            if written:
                log.warning("%s failed; what its runtimes wrote to stderr:\n%s", what, written)
            raise
        finally:
            if saved is not None:
                _restore_stderr(saved)


@contextlib.contextmanager
def _log_handlers_writing_to(stream) -> Iterator[None]:
    """Inside, the log handlers that write to file descriptor 2 (``logging.basicConfig``'s) write to ``stream``."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = {h for logger in loggers if isinstance(logger, logging.Logger) for h in logger.handlers}
    moved = [(h, h.stream) for h in handlers if isinstance(h, logging.StreamHandler) and _writes_to_fd_2(h.stream)]
    for handler, _ in moved:
        handler.setStream(stream)
    try:
        yield
    finally:
        for handler, previous in moved:
            handler.setStream(previous)


def _writes_to_fd_2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # an in-memory stream (pytest's caplog), a closed one
        return False


def _flush_stderr() -> None:
    with contextlib.suppress(Exception):  # a closed or replaced sys.stderr: nothing of ours to flush
        sys.stderr.flush()


def _restore_stderr(saved: int) -> None:
    _flush_stderr()  # what Python wrote inside belongs with the rest that was kept
    os.dup2(saved, 2)
    os.close(saved)


@dataclass(frozen=True)
class Runner:
    """A model as one engine runs it: ``runner(images)`` -> logits, float32 CPU tensors in and out.

    ``bind`` is for timing only: it places one batch where the engine reads it (a GPU buffer, an
    infer request's input) and returns the bare call, so that the copy is not timed. Without it the
    call is timed as it is.
    """

    run: Logits
    bind: Callable[[Tensor], Callable[[], object]] | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # what the file read back holds (open), else {}
    max_batch: int | None = None  # the largest batch one call of the engine takes, where the file fixes it

    def __call__(self, images: Tensor) -> Tensor:
        return self.run(images)

    def timed(self, images: Tensor) -> Callable[[], object]:
        """The zero-argument call the timer repeats on ``images``."""
        if self.bind is not None:
            return self.bind(images)
        return lambda: self.run(images)


# The input layouts an engine may write (export.layout): phone camera pipelines hand over NHWC pixels (Android's
# Bitmap, LiteRT's and MediaPipe's image helpers), PyTorch and ONNX take NCHW. Only LiteRT writes either.
LAYOUTS = ("nhwc", "nchw")


@dataclass(frozen=True)
class Check:
    """What an export is held to and written with: its outputs' tolerance, the ONNX opset and the input layout asked for."""

    atol: float
    rtol: float
    onnx_opset: int | None = None
    layout: str = LAYOUTS[0]  # the file's input layout where its engine offers a choice (LiteRT); NCHW elsewhere


@dataclass(frozen=True)
class Export:
    """One file the export stage wrote, where it will be once the run is done, and how it was checked."""

    path: str  # in out_dir
    format: str  # "onnx", "openvino int8", ...
    input_shape: list[int]  # (C, H, W) it was exported at: the model's own
    runtime: str | None = None  # what read it back ("onnxruntime 1.23.0")
    check: str | None = None  # how it was checked, when not by comparing outputs
    max_abs_err: float | None = None  # its outputs against the model's, at checked_batch_sizes
    max_rel_err: float | None = None
    checked_batch_sizes: list[int] | None = None
    max_batch: int | None = None  # the largest batch one call takes, where the format fixes it (ExecuTorch: 1)
    # OpenVINO: the precision a plain compile_model(path, "CPU") runs at here, and its errors against the model
    plain_runtime: dict | None = None

    @classmethod
    def from_info(cls, info: Mapping, *, path: Path, input_shape: Sequence[int]) -> Export:
        """From an engine's fields (``format``, ``runtime``, errors, ...), at its final ``path``."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(
            **{**{k: v for k, v in info.items() if k in known}, "path": str(path), "input_shape": list(input_shape)}
        )

    def as_dict(self) -> dict:
        """For ``report.json``: the fields that apply to this format."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


@dataclass
class Int8Artifact:
    """What an engine's int8 quantizer made: the thing written to its file, and how to run it for the gate."""

    method: str  # how it was quantized, for the report
    model: object  # an openvino.Model, the QDQ ONNX file's bytes, the .pte's or .tflite's bytes
    run: Logits
    worst_layers: list[dict] = field(default_factory=list)  # per-layer error, where the engine measures it
    fp32_layers: list[str] = field(default_factory=list)  # kept in fp32 (accuracy control)


@dataclass
class Int8Model:
    """One engine's int8 model and how it did at the gate."""

    engine: str  # a registry name: "openvino", "onnxruntime", ...
    method: str
    model: object
    run: Logits
    top1: float  # percent
    drop: float  # fp32 top-1 minus int8 top-1, in points
    agreement: float  # fraction of validation images where int8 and fp32 predict the same class
    passed: bool
    fp32_layers: list[str] = field(default_factory=list)  # kept in fp32 by accuracy control
    worst_layers: list[dict] = field(default_factory=list)
    precision: str = "int8"  # or a reduced float precision of the engine's (bf16, fp16), judged by the same gate

    @property
    def key(self) -> str:
        """Its name in the gate's results and the report: ``openvino`` (int8), ``openvino_bf16``."""
        return self.engine if self.precision == "int8" else f"{self.engine}_{self.precision}"


class Engine:
    """One inference engine: what it needs, how it writes, checks, opens and times a model.

    Subclasses set :attr:`name` and :attr:`title` and override what they support; what they do not
    raises :class:`NotImplementedError`, which the registry never asks for (it lists what each does).
    """

    name: str = ""  # the registry's name
    title: str = ""  # for messages: "OpenVINO"
    backends: tuple[str, ...] = ()  # the names it is timed under (bench.backends)
    refused: str | None = None  # why predict does not run its files, where it does not

    def missing(self, device: torch.device | None = None) -> str | None:
        """Why this engine cannot run here (on ``device``), in one line, or None when it can."""
        return None

    def export(
        self, model: nn.Module, path: Path, example: Tensor, metadata: Mapping[str, str], *, check: Check,
        precision: str = "fp32",
    ) -> dict:  # fmt: skip
        """Write ``model`` at ``path`` in ``precision``, read it back with this engine, check it; the record's fields.

        Raises:
            ValueError: The file read back does not reproduce the model within ``check`` (no file is left).
        """
        raise NotImplementedError(f"{self.name} writes no files")

    def open(self, path: Path, threads: int, *, precision: str | None = None) -> Runner:
        """A file this engine wrote, run on ``threads`` threads, with its metadata (:attr:`Runner.metadata`).

        Raises:
            UserError: The file is not of this format, or this engine does not run files (one line why).
        """
        raise NotImplementedError(f"{self.name} opens no files")

    def read_metadata(self, path: Path) -> dict[str, str]:
        """The deploy metadata stored in ``path``, as strings (``{}`` when it holds none)."""
        raise NotImplementedError(f"{self.name} reads no files")

    def applicable(self, backend: str, dtype: str, device: torch.device) -> str | None:
        """Why ``backend`` (one of :attr:`backends`) in ``dtype`` is not timed on ``device``, or None."""
        if device.type != "cpu":
            return f"{self.title} is timed on the CPU; this run times the GPU"
        return self.missing() or (None if dtype == "fp32" else f"the {self.title} export is float32")

    def runner(
        self, model: nn.Module, backend: str, dtype: str, *, device: torch.device, workdir: Path,
        image_shape: tuple[int, int, int], max_batch: int = 128,
    ) -> Runner:  # fmt: skip
        """``model`` (float32, CPU, eval) prepared for timing under ``backend`` in ``dtype``."""
        raise NotImplementedError(f"{self.name} is not timed")

    # -- int8, for the engines that quantize ----------------------------------------------------------------

    def int8(
        self, model: nn.Module, calibration: Tensor, *, metadata: Mapping[str, str], worst_layers: int = 0
    ) -> Int8Artifact:
        """``model`` quantized to int8 on ``calibration`` ``(N, C, H, W)``, for the accuracy gate to judge."""
        raise NotImplementedError(f"{self.name} does not quantize")

    def int8_with_accuracy_control(
        self, model: nn.Module, calibration: Tensor, batches, *, max_drop: float
    ) -> Int8Artifact | None:
        """A second try after failing the gate, keeping in fp32 what costs most top-1 on ``batches``; None: no such mode."""
        return None

    def write_int8(
        self, int8: Int8Model, path: Path, metadata: Mapping[str, str], example: Tensor, *, check: Check
    ) -> dict:
        """Write the gated int8 model at ``path``; the file, read back, must reproduce ``int8.run``."""
        raise NotImplementedError(f"{self.name} does not quantize")

    def int8_runners(
        self, passed: Mapping[str, Int8Model], *, device: torch.device, backends: Sequence[str]
    ) -> dict[str, Callable[[Path], Runner]]:
        """``{backend: build(workdir) -> Runner}``: the int8 models that passed the gate, timed by this engine."""
        return {}

    # -- reduced float precisions judged by the int8 gate, for the engines whose registry entry lists ``floats`` --

    def float_missing(self, precision: str) -> str | None:
        """Why this engine does not run ``precision`` (one of its ``floats``) natively here, or None when it does."""
        return f"{self.title} has no {precision}"

    def low_precision(self, model: nn.Module, calibration: Tensor, precision: str) -> Int8Artifact:
        """``model`` run at ``precision``, for the accuracy gate to judge as it judges int8."""
        raise NotImplementedError(f"{self.name} has no reduced float precision")

    def write_low_precision(
        self, gated: Int8Model, path: Path, metadata: Mapping[str, str], example: Tensor, *, check: Check
    ) -> dict:
        """Write the gated ``gated.precision`` model at ``path``; the file, read back, must reproduce ``gated.run``."""
        raise NotImplementedError(f"{self.name} has no reduced float precision")

    def low_precision_runners(
        self, passed: Mapping[str, Int8Model], *, device: torch.device, backends: Sequence[str]
    ) -> dict[tuple[str, str], Callable[[Path], Runner]]:
        """``{(backend, precision): build(workdir) -> Runner}``: its gated float models that passed, timed."""
        return {}


def check_outputs(model: Logits, run: Logits, example: Tensor, *, check: Check, what: str) -> dict:
    """``run``'s logits against ``model``'s at :data:`CHECK_BATCH_SIZES`; the worst errors, or ValueError over ``check``."""
    worst_abs, worst_rel = output_errors(model, run, example)
    if not within_tolerance(worst_abs, worst_rel, atol=check.atol, rtol=check.rtol):
        raise OutputMismatch(
            f"{what} does not reproduce the model: max error {worst_abs:.2e} abs, {worst_rel:.2e} rel "
            f"(tolerance atol {check.atol:g}, rtol {check.rtol:g})"
        )
    log.info(
        "%s matches the model at batch sizes %s: %.1e abs, %.1e rel", what, CHECK_BATCH_SIZES, worst_abs, worst_rel
    )
    return {"checked_batch_sizes": list(CHECK_BATCH_SIZES), "max_abs_err": worst_abs, "max_rel_err": worst_rel}


def output_errors(model: Logits, run: Logits, example: Tensor) -> tuple[float, float]:
    """The worst absolute and relative errors of ``run``'s logits against ``model``'s at :data:`CHECK_BATCH_SIZES`."""
    worst_abs, worst_rel = 0.0, 0.0
    with torch.inference_mode():
        for batch_size in CHECK_BATCH_SIZES:
            images = torch.randn(batch_size, *example.shape[1:], generator=torch.Generator().manual_seed(batch_size))
            abs_err, rel_err = max_errors(model(images), run(images))
            worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
    return worst_abs, worst_rel


# An engine's logits against the float32 model's, relative to the largest logit: TensorRT picks its own
# kernels (TF32 in fp32 on Ampere and later, half precision in fp16), so the bound is its precision's.
ENGINE_RTOL = {"fp32": 1e-2, "fp16": 3e-2}


def check_engine(model: nn.Module, runner: Runner, example: Tensor, *, dtype: str, what: str) -> None:
    """Raise when an engine that builds kernels of its own (TensorRT, LiteRT) does not reproduce ``model``.

    Its runner is then reported as skipped, with why: a figure for a model that computes something else is no figure.
    """
    with torch.inference_mode():
        reference = model(example)
        output = runner.timed(example)()
    output = torch.as_tensor(output[0] if isinstance(output, list | tuple) else output).float().cpu()
    rel_err = max_errors(reference, output)[1]
    if not rel_err <= ENGINE_RTOL[dtype]:
        raise ValueError(f"{what} does not reproduce the model: {rel_err:.2e} relative error")


def io_metadata(input_shape: Sequence[int], *, layout: str = "nchw") -> dict[str, str]:
    """What a file taking ``input_shape`` ``(C, H, W)`` images in ``layout`` at batch 1 takes and gives, for its metadata.

    A phone app reads it to feed the file: ``input_layout`` (``NHWC``, ``NCHW``), ``input_dtype``,
    ``input_shape`` (JSON, with the batch), ``output_dtype``.
    """
    channels, height, width = input_shape
    shape = [1, height, width, channels] if layout == "nhwc" else [1, channels, height, width]
    return {
        "input_layout": layout.upper(),
        "input_dtype": "float32",
        "input_shape": json.dumps(shape),
        "output_dtype": "float32",
    }


def one_line(err: BaseException) -> str:
    """``"ValueError: the first line of its message"``, at most 300 characters: how a skipped runner says why."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
