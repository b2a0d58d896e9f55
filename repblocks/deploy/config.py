"""The settings of a deploy run, as frozen dataclasses built from plain dicts (what deploy.py's Hydra config gives).

Every setting is checked when the config is built, before anything is loaded or written: a typo
in a name, a value of the wrong type or out of range is one :class:`repblocks.errors.UserError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from repblocks.deploy.export import EXPORT_FORMATS
from repblocks.errors import UserError

__all__ = ["BenchConfig", "DeployConfig", "ExportConfig", "VerifyConfig"]


@dataclass(frozen=True)
class VerifyConfig:
    """How the deploy form is checked against the train form."""

    atol: float = 1e-4  # max absolute error of the logits ...
    rtol: float = 1e-4  # ... or max error relative to the largest logit (either passes); fp32 rounding gives ~1e-6
    batch_size: int = 8  # random images per check
    real_batches: int = 4  # validation batches when the checkpoint's data is available; 0: none


@dataclass(frozen=True)
class ExportConfig:
    """Which files to write."""

    formats: tuple[str, ...] = EXPORT_FORMATS  # any of repblocks.deploy.export.EXPORT_FORMATS; () exports nothing
    onnx_opset: int | None = None  # None: the exporter's default


@dataclass(frozen=True)
class BenchConfig:
    """What to time. None picks a default for the device."""

    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    batch_sizes: tuple[int, ...] | None = None  # CPU (1, 16), CUDA (1, 32, 128); () times nothing
    image_size: int | None = None  # the checkpoint's, else 224
    dtypes: tuple[str, ...] | None = None  # CPU fp32; CUDA fp32, fp16, bf16
    backends: tuple[str, ...] | None = None  # eager, channels_last, onnxruntime (compile is opt-in: slow to build)
    rounds: int = 20  # timed calls per runner, interleaved
    warmup: int = 2  # untimed calls per runner first
    threads: int | None = None  # torch and onnxruntime intra-op threads; None: torch's choice
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest kernels, as deployments do
    tf32: bool = (
        True  # fp32 convs in TF32 on Ampere+ GPUs (PyTorch's default); false: full fp32, as on the paper's 1080Ti
    )


@dataclass(frozen=True)
class DeployConfig:
    """One deploy run. Exactly one of ``ckpt``, ``model``, ``source`` or ``models`` says what to load
    (``ckpt`` with ``model`` when the file holds bare weights)."""

    ckpt: str | None = None  # train.py checkpoint, or a weights file in any layout load_weights reads
    model: str | None = None  # registry name: random weights, or the architecture of a bare weights file
    source: str | None = None  # "torchvision:NAME": a torchvision classifier, Conv+BN folded
    models: tuple[str, ...] | None = None  # many models timed side by side (registry or torchvision: names)
    num_classes: int | None = None  # None: from the checkpoint or weights, else 1000
    out_dir: str = "deploy_out"
    seed: int = 0  # random BN statistics and inputs
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    @classmethod
    def from_dict(cls, config: Mapping) -> DeployConfig:
        """Build from plain nested dicts and lists (what ``OmegaConf.to_container`` gives)."""
        nested = {"verify": VerifyConfig, "export": ExportConfig, "bench": BenchConfig}
        values = {}
        for key, value in config.items():
            if key in nested:
                values[key] = _dataclass_from(nested[key], value or {}, prefix=f"{key}.")
            else:
                values[key] = value
        return _dataclass_from(cls, values)


def _dataclass_from(cls: type, values: Mapping, prefix: str = ""):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown setting {prefix}{unknown[0]}; known: {', '.join(prefix + k for k in sorted(known))}")
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})
