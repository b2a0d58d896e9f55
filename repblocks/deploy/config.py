"""The settings of a deploy run, as frozen dataclasses built from plain dicts (what deploy.py's Hydra config gives).

Every setting is checked when its dataclass is built, before anything is loaded or written: a
typo in a name, a value of the wrong type, out of range or not among the known names is one
:class:`repblocks.errors.UserError` that names the setting. Each field's type is its annotation;
its range and known names are data, in the field's ``metadata``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import onnx.defs

from repblocks.checkpoint import PREPROCESSING_KEYS
from repblocks.deploy.engines import (
    BACKENDS,
    DEFAULT_BACKENDS,
    DEFAULT_EXPORTS,
    DTYPE_NAMES,
    EXPORT_FORMATS,
    FLOAT_PRECISIONS,
    MIN_ONNX_OPSET,
    QUANT_ENGINES,
)
from repblocks.deploy.engines.base import LAYOUTS
from repblocks.errors import UserError

__all__ = [
    "MAX_IMAGE_SIZE",
    "QUANT_ENGINES",
    "BenchConfig",
    "DeployConfig",
    "ExportConfig",
    "QuantizeConfig",
    "VerifyConfig",
]

# No classifier input is larger; at 20000x20000 one float32 image alone would take 4.5 GiB.
MAX_IMAGE_SIZE = 4096
MAX_BATCH_SIZE = 4096
PRECISIONS = ("int8",)
# NNCF into OpenVINO, onnxruntime's static QDQ quantizer; the others are asked for by name (ExecuTorch's is
# added when export.formats has it), as their exports are.
DEFAULT_QUANT_ENGINES = ("openvino", "onnxruntime")


def _range(low: float, high: float | None = None, *, why_high=None) -> dict:
    """Field metadata: the lowest and highest value, and a function saying why above ``high`` is refused."""
    return {"min": low, "max": high, "why_max": why_high}


def _image_size_limit(size: int) -> str:
    gib = 3 * size * size * 4 / 2**30
    return f"one 3x{size}x{size} float32 image alone is {gib:.1f} GiB, before any layer runs"


@dataclass(frozen=True)
class _Checked:
    """Checks every field against its annotation and metadata when built; lists become tuples."""

    prefix: ClassVar[str] = ""  # how the settings are named on the command line ("bench.")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, spec.name, value)  # frozen: the one place a field is normalized
            _check(f"{self.prefix}{spec.name}", value, hints[spec.name], spec.metadata)


@dataclass(frozen=True)
class VerifyConfig(_Checked):
    """How the deploy form is checked against the train form."""

    prefix: ClassVar[str] = "verify."
    atol: float = field(default=1e-4, metadata=_range(0))  # max absolute error of the logits ...
    rtol: float = field(default=1e-4, metadata=_range(0))  # ... or relative to the largest logit; fp32 gives ~1e-6
    batch_size: int = field(default=8, metadata=_range(1, MAX_BATCH_SIZE))  # random images per check
    # Validation batches compared when the data is there. None: all, the images training validated and
    # checked its deploy weights on, so that both report the same count; N: the first N; 0: none.
    real_batches: int | None = field(default=None, metadata=_range(0))


@dataclass(frozen=True)
class ExportConfig(_Checked):
    """Which files to write."""

    prefix: ClassVar[str] = "export."
    # Any of repblocks.deploy.engines.EXPORT_FORMATS; () exports nothing; None: every one whose engine is installed.
    formats: tuple[str, ...] | None = field(default=None, metadata={"known": EXPORT_FORMATS, "what": "export format"})
    # None: the exporter's default. Below 18 the torch.export-based exporter would silently write 18.
    onnx_opset: int | None = field(default=None, metadata=_range(MIN_ONNX_OPSET, onnx.defs.onnx_opset_version()))
    # The .tflite's input layout: nhwc, what a phone's camera pipeline gives; nchw, the model's own. Other files: NCHW.
    layout: str = field(default=LAYOUTS[0], metadata={"known": LAYOUTS, "what": "export.layout"})

    def __post_init__(self) -> None:
        if self.formats is None:
            object.__setattr__(self, "formats", DEFAULT_EXPORTS)  # frozen: filled in once, here
        super().__post_init__()


@dataclass(frozen=True)
class BenchConfig(_Checked):
    """What to time. None picks a default for the device (:meth:`for_device`)."""

    prefix: ClassVar[str] = "bench."
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    # CPU (1, 16), CUDA (1, 32, 128); () times nothing.
    batch_sizes: tuple[int, ...] | None = field(default=None, metadata=_range(1, MAX_BATCH_SIZE))
    # The timed input's side; None: the model's own input size. Exports always take the model's own.
    image_size: int | None = field(default=None, metadata=_range(1, MAX_IMAGE_SIZE, why_high=_image_size_limit))
    dtypes: tuple[str, ...] | None = field(default=None, metadata={"known": DTYPE_NAMES, "what": "dtype"})
    # Every backend but compile (opt-in: minutes to build on a small CPU); those that cannot run here are listed as skipped.
    backends: tuple[str, ...] | None = field(default=None, metadata={"known": BACKENDS, "what": "backend"})
    rounds: int = field(default=20, metadata=_range(1))  # timed calls per runner, interleaved
    warmup: int = field(default=2, metadata=_range(0))  # untimed calls per runner first
    # torch and onnxruntime intra-op threads; None: as many as the cores other processes leave free
    threads: int | None = field(default=None, metadata=_range(1))
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest kernels, as deployments do
    tf32: bool = True  # fp32 convs in TF32 on Ampere+ GPUs (PyTorch's default); false: full fp32, as on a 1080Ti

    def for_device(self, device_type: str, *, batch_sizes: tuple[int, ...] | None = None) -> BenchConfig:
        """These settings with every None filled in for ``device_type`` (``"cpu"`` or ``"cuda"``)."""
        cuda = device_type == "cuda"
        defaults = {
            "batch_sizes": batch_sizes or ((1, 32, 128) if cuda else (1, 16)),
            "dtypes": ("fp32", "fp16", "bf16") if cuda else ("fp32",),
            "backends": DEFAULT_BACKENDS,
        }
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


@dataclass(frozen=True)
class QuantizeConfig(_Checked):
    """int8 post-training quantization, gated on validation accuracy (:mod:`repblocks.deploy.quantize`)."""

    prefix: ClassVar[str] = "quantize."
    precision: str | None = field(default=None, metadata={"known": PRECISIONS, "what": "quantize.precision"})
    # Each engine quantizes on its own; an engine's int8 model is exported only if it passes the gate.
    engines: tuple[str, ...] = field(
        default=DEFAULT_QUANT_ENGINES, metadata={"known": QUANT_ENGINES, "what": "quantize engine"}
    )
    max_drop: float = field(default=1.0, metadata=_range(0, 100))  # top-1 points int8 may lose against fp32
    # None: the run's own training images (as prepared for evaluation); else a folder of images, searched recursively.
    calibration: str | None = None
    calibration_images: int = field(default=300, metadata=_range(1, 100_000))  # drawn at random, seeded
    # None: the run's own validation images; else a folder of labelled images, DIR/<class>/<image> (ImageFolder).
    validation: str | None = None
    # With validation: a text file of the class folder names in output order (line 1 = output 0), e.g. ImageNet wnids.
    class_names: str | None = None
    eval_images: int | None = field(default=None, metadata=_range(1))  # validation images for the gate; None: all
    # NNCF's accuracy-control mode, when plain int8 fails the gate: it keeps the layers that cost most in fp32.
    accuracy_control: bool = True
    worst_layers: int = field(default=5, metadata=_range(0))  # layers listed by quantization error in the report
    # bf16/fp16 through the engines that run them (OpenVINO), judged by the same gate; skipped, saying why,
    # on CPUs without them.
    floats: tuple[str, ...] = field(
        default=(), metadata={"known": FLOAT_PRECISIONS, "what": "quantize float precision"}
    )


@dataclass(frozen=True)
class DeployConfig(_Checked):
    """One deploy run. Exactly one of ``ckpt``, ``model``, ``source`` or ``models`` says what to load
    (``ckpt`` with ``model`` when the file holds bare weights)."""

    # A train.py checkpoint or run folder, deploy.py's model.safetensors, or weights of any layout and form.
    ckpt: str | None = None
    model: str | None = None  # registry name: random weights, or the architecture of a bare weights file
    source: str | None = None  # "torchvision:NAME": a torchvision classifier, Conv+BN folded
    models: tuple[str, ...] | None = None  # many models timed side by side (registry or torchvision: names)
    num_classes: int | None = field(default=None, metadata=_range(1))  # None: from the weights, else 1000
    out_dir: str = "deploy_out"  # replaced whole at the end of a run; never left half-written
    seed: int = 0  # random BN statistics and inputs
    # input_size, mean, std, crop_pct, interpolation: each one set (not None) replaces what the weights or the model say
    preprocessing: dict | None = None
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.preprocessing or {}) - set(PREPROCESSING_KEYS), key=str)
        if unknown:
            raise UserError(f"unknown setting preprocessing.{unknown[0]}; known: {', '.join(PREPROCESSING_KEYS)}")

    @classmethod
    def from_dict(cls, config: Mapping) -> DeployConfig:
        """Build from plain nested dicts and lists (what ``OmegaConf.to_container`` gives).

        Raises:
            UserError: An unknown setting, or a value of the wrong type, out of range or unknown.
        """
        nested = {"verify": VerifyConfig, "export": ExportConfig, "bench": BenchConfig, "quantize": QuantizeConfig}
        values = {}
        for key, value in config.items():
            if key == "quantize" and isinstance(value, str):  # quantize="int8", as on deploy.py's command line
                value = {"precision": value}
            if key in nested:
                if not isinstance(value, Mapping | None):
                    raise UserError(f"{key} must be a group of settings ({key}.NAME=VALUE), got {value!r}")
                values[key] = _dataclass_from(nested[key], value or {}, prefix=f"{key}.")
            else:
                values[key] = value
        return _dataclass_from(cls, values)


def _dataclass_from(cls: type, values: Mapping, prefix: str = ""):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        raise UserError(f"unknown setting {prefix}{unknown[0]}; known: {', '.join(prefix + k for k in sorted(known))}")
    return cls(**values)


def _check(name: str, value: object, hint: object, limits: Mapping) -> None:
    if not _matches(value, hint):
        raise UserError(f"{name} must be {_describe(hint)}, got {value!r}")
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, int | float) and not isinstance(item, bool):
            _check_range(name, item, limits)
        elif isinstance(item, str) and "known" in limits:
            _check_known(limits["what"], item, limits["known"])


def _check_range(name: str, value: int | float, limits: Mapping) -> None:
    low, high, why_high = limits.get("min"), limits.get("max"), limits.get("why_max")
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    if low is not None and value < low:
        raise UserError(f"{name} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise UserError(f"{name} must be at most {high}, got {value}" + (f": {why_high(value)}" if why_high else ""))


def _check_known(what: str, value: str, known: tuple[str, ...]) -> None:
    if value in known:
        return
    if value == "torchscript":
        raise UserError("TorchScript is deprecated in torch 2.x; export.formats=[torch_export] writes its successor")
    raise UserError(f"unknown {what} {value!r}; known: {', '.join(known)}")


def _matches(value: object, hint: object) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple) and all(_matches(item, args[0]) for item in value)
    if hint is float:  # an integer is a number too (atol=0)
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:  # True is an int to Python, not to a user
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: object) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple:
        return "a list of " + {int: "integers", str: "names"}.get(args[0], "values")
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
