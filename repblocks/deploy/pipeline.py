"""The deploy pipeline: load safely, convert, verify, export, benchmark, report.

``run_deploy(DeployConfig.from_dict({...}))`` does, in order:

1. load the network: a train.py checkpoint, a weights file with a model name, a registered model
   with random weights (and random BN statistics), or a torchvision classifier; ``weights_only=True`` always;
2. convert it with ``switch_to_deploy`` and verify the deploy form against the train form on random
   images (and on validation images when the checkpoint's data config is available); over tolerance,
   stop with :class:`repblocks.errors.UserError` before anything is written;
3. export the deploy form (``repblocks.deploy.export``), every file checked before it takes its name;
4. time train vs deploy form side by side per backend and dtype (``repblocks.deploy.speed``);
5. write ``report.json``, ``report.md`` and a throughput plot (``repblocks.deploy.report``).

With ``models=[...]`` it instead times many models' deploy forms (and torchvision models before and
after Conv+BN folding) side by side: the RepVGG paper's speed table. The library never imports Hydra;
``deploy.py`` at the repository root turns its config into the plain dict this module takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from repblocks.convert import switch_to_deploy
from repblocks.deploy.config import BenchConfig, DeployConfig, ExportConfig, VerifyConfig
from repblocks.deploy.engines import BACKENDS, DTYPES
from repblocks.deploy.export import EXPORT_FORMATS, FILE_NAMES, export_onnx, export_safetensors, export_torch_export
from repblocks.deploy.report import write_reports, write_speed_table
from repblocks.deploy.sources import TORCHVISION, Network, load_network
from repblocks.deploy.speed import benchmark_forms, fastest_deploy, speed_table
from repblocks.deploy.verify import verify
from repblocks.errors import UserError, user_errors
from repblocks.numerics import ieee_fp32

__all__ = ["BenchConfig", "DeployConfig", "ExportConfig", "VerifyConfig", "run_deploy", "run_speed_table"]

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224


def run_deploy(config: DeployConfig) -> dict:
    """Load, convert, verify, export, benchmark and report; return the report (also in ``out_dir``).

    Raises:
        UserError: Bad input (the message says what exists), or the deploy form fails its checks.
            Nothing is written to ``out_dir`` before verification has passed.
    """
    if config.models:
        return run_speed_table(config)
    device = resolve_device(config.bench.device)
    bench = _bench_defaults(config.bench, device)
    _check_names(config.export.formats, bench)
    with _threads(bench.threads):
        network = load_network(
            ckpt=config.ckpt, model=config.model, source=config.source, num_classes=config.num_classes, seed=config.seed
        )
        image_size = bench.image_size or network.image_size or DEFAULT_IMAGE_SIZE
        image_shape = (network.in_chans, image_size, image_size)

        start = time.perf_counter()
        plain = switch_to_deploy(network.model)
        conversion_s = time.perf_counter() - start
        log.info("converted %s in %.3f s", network.name, conversion_s)

        verification = verify(
            network,
            plain,
            device=device,
            image_shape=image_shape,
            dtypes=bench.dtypes,
            settings=config.verify,
            seed=config.seed,
        )
        out_dir = Path(config.out_dir)
        exports = export_all(network, plain, config, out_dir=out_dir, image_shape=image_shape)
        with _cudnn_benchmark(bench.cudnn_benchmark), ieee_fp32(not bench.tf32):
            rows, skipped = benchmark_forms(
                {"train": network.model, "deploy": plain},
                device=device,
                batch_sizes=bench.batch_sizes,
                image_shape=image_shape,
                backends=bench.backends,
                dtypes=bench.dtypes,
                rounds=bench.rounds,
                warmup=bench.warmup,
            )
        report = {
            "model": network.name,
            "origin": network.origin,
            "device": describe_device(device),
            "image_shape": list(image_shape),
            "num_classes": network.num_classes,
            "conversion_s": conversion_s,
            "max_abs_err": verification["max_abs_err"],
            "max_rel_err": verification["max_rel_err"],
            "top1_agreement": verification["top1_agreement"],
            "verify": verification,
            "exports": exports,
            "benchmark": rows,
            "fastest_deploy": fastest_deploy(rows),
            "skipped": skipped,
            "timer": _timer_note(bench),
            "environment": _environment(device, bench),
        }
    report["files"] = {name: str(path) for name, path in write_reports(report, out_dir).items()}
    return report


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for CUDA without one is a :class:`UserError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"bench.device={name} but no CUDA device is available; use bench.device=cpu or auto")
        return torch.device(name)
    raise UserError(f"unknown bench.device {name!r}; known: auto, cpu, cuda, cuda:N")


def _bench_defaults(bench: BenchConfig, device: torch.device) -> BenchConfig:
    cuda = device.type == "cuda"
    defaults = {
        "batch_sizes": (1, 32, 128) if cuda else (1, 16),
        "dtypes": ("fp32", "fp16", "bf16") if cuda else ("fp32",),
        "backends": ("eager", "channels_last", "onnxruntime"),
    }
    return dataclasses.replace(bench, **{k: v for k, v in defaults.items() if getattr(bench, k) is None})


def _check_names(formats: tuple[str, ...], bench: BenchConfig) -> None:
    for what, names, known in [
        ("export format", formats, EXPORT_FORMATS),
        ("backend", bench.backends, BACKENDS),
        ("dtype", bench.dtypes, tuple(DTYPES)),
    ]:
        unknown = [name for name in names if name not in known]
        if unknown == ["torchscript"]:
            raise UserError(
                "TorchScript is deprecated in torch 2.x; export.formats=[torch_export] writes its successor"
            )
        if unknown:
            raise UserError(f"unknown {what} {unknown[0]!r}; known: {', '.join(known)}")
    if any(size < 1 for size in bench.batch_sizes) or bench.rounds < 1:
        raise UserError(f"batch sizes and rounds must be positive, got {list(bench.batch_sizes)}, {bench.rounds}")


def export_all(
    network: Network, plain: nn.Module, config: DeployConfig, *, out_dir: Path, image_shape: tuple[int, int, int]
) -> dict:
    """Write each format of ``config.export.formats`` into ``out_dir``; returns what was written and checked."""
    settings = config.verify
    example = torch.randn(2, *image_shape, generator=torch.Generator().manual_seed(config.seed))  # (2, C, H, W)
    metadata = {
        "model": network.name,
        "num_classes": str(network.num_classes),
        "in_chans": str(network.in_chans),
        "model_kwargs": json.dumps(network.model_kwargs),
        "form": "deploy",
    }
    exports = {}
    for fmt in config.export.formats:
        path = out_dir / FILE_NAMES[fmt]
        log.info("exporting %s to %s", fmt, path)
        with user_errors():  # an export that does not reproduce the model stops the run in one line
            if fmt == "safetensors":
                exports[fmt] = export_safetensors(plain, path, rebuild=network.rebuild_deploy, metadata=metadata)
            elif fmt == "onnx":
                exports[fmt] = export_onnx(
                    plain, path, example, atol=settings.atol, rtol=settings.rtol, opset=config.export.onnx_opset
                )
            else:
                exports[fmt] = export_torch_export(plain, path, example, atol=settings.atol, rtol=settings.rtol)
    return exports


def run_speed_table(config: DeployConfig) -> dict:
    """Time many models' deploy forms side by side (the paper's speed table); torchvision ones also unfolded."""
    device = resolve_device(config.bench.device)
    bench = config.bench
    if bench.batch_sizes is None:  # the paper's batch of 128 on a GPU; on 2 CPU cores that would take an hour
        bench = dataclasses.replace(bench, batch_sizes=(128,) if device.type == "cuda" else (8,))
    bench = _bench_defaults(bench, device)
    image_size = bench.image_size or DEFAULT_IMAGE_SIZE
    image_shape = (3, image_size, image_size)
    with _threads(bench.threads):
        models = {}
        for name in config.models:
            models.update(_speed_table_entries(name, image_shape, config))
        with _cudnn_benchmark(bench.cudnn_benchmark), ieee_fp32(not bench.tf32):
            rows = [
                row
                for batch_size in bench.batch_sizes
                for row in speed_table(
                    models,
                    device=device,
                    batch_size=batch_size,
                    image_shape=image_shape,
                    rounds=bench.rounds,
                    warmup=bench.warmup,
                )
            ]
        report = {
            "device": describe_device(device),
            "image_shape": list(image_shape),
            "dtype": "fp32",
            "backend": "eager",
            "rows": rows,
            "timer": _timer_note(bench),
            "environment": _environment(device, bench),
        }
    report["files"] = {name: str(path) for name, path in write_speed_table(report, Path(config.out_dir)).items()}
    return report


def _speed_table_entries(name: str, image_shape: tuple[int, int, int], config: DeployConfig) -> dict[str, nn.Module]:
    """``{name: deploy form}``; a torchvision model also as it is (``{name: original, name folded: folded}``)."""
    source = name if name.startswith(TORCHVISION) else None
    network = load_network(model=None if source else name, source=source, seed=config.seed)
    plain = switch_to_deploy(network.model)
    # Two images on the CPU: the conversion is what is checked here, cheaply, before anything is timed.
    settings = dataclasses.replace(config.verify, batch_size=2, real_batches=0)
    cpu = torch.device("cpu")
    verify(network, plain, device=cpu, image_shape=image_shape, dtypes=("fp32",), settings=settings, seed=config.seed)
    if name.startswith(TORCHVISION):
        return {name: network.model, f"{name} folded": plain}
    return {name: plain}


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def describe_device(device: torch.device) -> str:
    """``"cpu (2 threads)"`` or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _timer_note(bench: BenchConfig) -> str:
    return (
        f"time.perf_counter around each call, between device synchronizations (repblocks.bench.time_interleaved); "
        f"median and p90 of {bench.rounds} rounds after {bench.warmup} warm-up calls, every runner of a batch size "
        "interleaved in one process; onnxruntime with torch's thread count and without spinning idle threads"
    )


def _environment(device: torch.device, bench: BenchConfig) -> dict:
    import onnxruntime

    environment = {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        # "tf32": fp32 convs ran in TF32 on Ampere and later, as PyTorch does by default (the paper's 1080Ti cannot).
        environment["fp32_conv_precision"] = torch.backends.cudnn.conv.fp32_precision if bench.tf32 else "ieee"
    return environment
