"""The deploy pipeline: load safely, convert, verify, export, benchmark, report.

``run_deploy(DeployConfig.from_dict({...}))`` does, in order:

1. load the network: a train.py checkpoint, a weights file with a model name, a registered model
   with random weights (and random BN statistics), or a torchvision classifier; ``weights_only=True`` always;
2. convert it with ``switch_to_deploy`` and verify the deploy form against the train form on random
   images (and on validation images when the checkpoint's data config is available); over tolerance,
   stop with :class:`DeployError` before anything is written;
3. export the deploy form (``repblocks.export``), every file checked before it takes its name;
4. time train vs deploy form side by side per backend and dtype (``repblocks.speed``);
5. write ``report.json``, ``report.md`` and a throughput plot (``repblocks.report``).

With ``models=[...]`` it instead times many models' deploy forms (and torchvision models before and
after Conv+BN folding) side by side: the RepVGG paper's speed table. The library never imports Hydra;
``deploy.py`` at the repository root turns its config into the plain dict this module takes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from repblocks.convert import switch_to_deploy
from repblocks.export import EXPORT_FORMATS, FILE_NAMES, export_onnx, export_safetensors, export_torch_export
from repblocks.registry import create_model
from repblocks.report import write_reports, write_speed_table
from repblocks.speed import BACKENDS, DTYPES, applicable, benchmark_forms, fastest_deploy, speed_table
from repblocks.testing import max_errors, randomize_bn_, within_tolerance
from repblocks.weights import load_weights, read_checkpoint, to_repblocks_layout

__all__ = ["BenchConfig", "DeployConfig", "DeployError", "ExportConfig", "VerifyConfig", "load_network", "run_deploy"]

log = logging.getLogger(__name__)

TORCHVISION = "torchvision:"
DEFAULT_IMAGE_SIZE = 224


class DeployError(ValueError):
    """Bad input, or a deploy form that fails its checks: the command line prints it as one line and exits 1."""


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

    formats: tuple[str, ...] = EXPORT_FORMATS  # any of repblocks.export.EXPORT_FORMATS; () exports nothing
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
        raise DeployError(
            f"unknown setting {prefix}{unknown[0]}; known: {', '.join(prefix + k for k in sorted(known))}"
        )
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


@dataclass
class Network:
    """A loaded network in train form and what is needed to rebuild and describe it."""

    name: str  # registry name, or "torchvision:NAME"
    model: nn.Module  # train form, eval mode, float32 on the CPU
    rebuild_deploy: Callable[[], nn.Module]  # an empty deploy-form model with the same structure
    num_classes: int
    in_chans: int = 3
    image_size: int | None = None  # what it was trained at, when known
    origin: str = ""  # where the weights came from, for the report
    model_kwargs: dict = field(default_factory=dict)
    data: Mapping | None = None  # the checkpoint's data config, for verification on real images


def run_deploy(config: DeployConfig) -> dict:
    """Load, convert, verify, export, benchmark and report; return the report (also in ``out_dir``).

    Raises:
        DeployError: Bad input (the message says what exists), or the deploy form fails its checks.
            Nothing is written to ``out_dir`` before verification has passed.
    """
    if config.models:
        return run_speed_table(config)
    device = resolve_device(config.bench.device)
    bench = _bench_defaults(config.bench, device)
    _check_names(config.export.formats, bench)
    with _threads(bench.threads):
        network = load_network(config)
        image_size = bench.image_size or network.image_size or DEFAULT_IMAGE_SIZE
        image_shape = (network.in_chans, image_size, image_size)

        start = time.perf_counter()
        plain = switch_to_deploy(network.model)
        conversion_s = time.perf_counter() - start
        log.info("converted %s in %.3f s", network.name, conversion_s)

        verification = verify(
            network, plain, device=device, image_shape=image_shape, dtypes=bench.dtypes, config=config
        )
        out_dir = Path(config.out_dir)
        exports = export_all(network, plain, config, out_dir=out_dir, image_shape=image_shape)
        with _cudnn_benchmark(bench.cudnn_benchmark):
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
            "environment": _environment(device),
        }
    report["files"] = {name: str(path) for name, path in write_reports(report, out_dir).items()}
    return report


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for CUDA without one is a :class:`DeployError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeployError(f"bench.device={name} but no CUDA device is available; use bench.device=cpu or auto")
        return torch.device(name)
    raise DeployError(f"unknown bench.device {name!r}; known: auto, cpu, cuda, cuda:N")


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
            raise DeployError(
                "TorchScript is deprecated in torch 2.x; export.formats=[torch_export] writes its successor"
            )
        if unknown:
            raise DeployError(f"unknown {what} {unknown[0]!r}; known: {', '.join(known)}")
    if any(size < 1 for size in bench.batch_sizes) or bench.rounds < 1:
        raise DeployError(f"batch sizes and rounds must be positive, got {list(bench.batch_sizes)}, {bench.rounds}")


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Errors of reading user input (missing file, bad checkpoint, unknown name) become :class:`DeployError`."""
    try:
        yield
    except DeployError:
        raise
    except (FileNotFoundError, ValueError) as err:
        raise DeployError(str(err)) from None


def load_network(config: DeployConfig) -> Network:
    """Build the network the config names, with its weights, in eval mode (see :class:`DeployConfig`)."""
    given = [key for key in ("ckpt", "source") if getattr(config, key)]
    if len(given) > 1 or (config.source and config.model):
        raise DeployError(
            "give one of ckpt=PATH, model=NAME, source=torchvision:NAME (ckpt with model for bare weights)"
        )
    with _user_errors():
        if config.source:
            return _torchvision_network(config.source, config.num_classes or 1000, seed=config.seed)
        if config.ckpt:
            return _checkpoint_network(config)
        if config.model:
            model = randomize_bn_(_build(config.model, num_classes=config.num_classes or 1000), seed=config.seed)
            return _registry_network(config.model, model.eval(), origin="random weights, random BN statistics")
    raise DeployError("nothing to deploy: give ckpt=PATH, model=NAME or source=torchvision:NAME")


def _build(name: str, *, deploy: bool = False, **kwargs) -> nn.Module:
    if name.startswith(TORCHVISION):
        raise DeployError(f"{name} is a torchvision model: pass it as source={name}")
    return create_model(name, deploy=deploy, **kwargs)


def _registry_network(name: str, model: nn.Module, *, origin: str, **extra) -> Network:
    kwargs = dict(extra.pop("model_kwargs", {}))
    num_classes, in_chans = model.num_classes, extra.pop("in_chans", 3)

    def rebuild() -> nn.Module:
        return create_model(name, deploy=True, num_classes=num_classes, in_chans=in_chans, **kwargs)

    return Network(name, model, rebuild, num_classes, in_chans, origin=origin, model_kwargs=kwargs, **extra)


def _checkpoint_network(config: DeployConfig) -> Network:
    checkpoint = read_checkpoint(config.ckpt)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    if isinstance(hparams, Mapping) and "model_name" in hparams and isinstance(checkpoint.get("state_dict"), Mapping):
        return _lightning_network(config, checkpoint, hparams)
    if not config.model:
        raise DeployError(
            f"{config.ckpt} is not a train.py checkpoint (no hyper_parameters.model_name); "
            "for a bare weights file, name its architecture: model=NAME"
        )
    if not isinstance(checkpoint, Mapping):
        raise DeployError(f"{config.ckpt} holds a {type(checkpoint).__name__}, not a state dict")
    num_classes = config.num_classes or _classes_in(checkpoint) or 1000
    model = load_weights(_build(config.model, num_classes=num_classes), checkpoint).eval()
    return _registry_network(config.model, model, origin=f"weights file {config.ckpt}")


def _lightning_network(config: DeployConfig, checkpoint: Mapping, hparams: Mapping) -> Network:
    name = hparams["model_name"]
    if config.model and config.model != name:
        raise DeployError(f"{config.ckpt} holds a {name}, but model={config.model} was given; leave model unset")
    prefix = hparams.get("weights_prefix", "model.")
    # The LightningModule's state also holds loss buffers, an EMA copy, ...: keep the network's own weights.
    state = {key[len(prefix) :]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    if not state:
        raise DeployError(f"{config.ckpt} has no weights under its weights_prefix {prefix!r}")
    kwargs = dict(hparams.get("model_kwargs") or {})
    in_chans = int(hparams.get("in_chans", 3))
    model = _build(name, num_classes=int(hparams["num_classes"]), in_chans=in_chans, **kwargs)
    load_weights(model, state)
    return _registry_network(
        name,
        model.eval(),
        origin=f"train.py checkpoint {config.ckpt} (weights under {prefix!r})",
        model_kwargs=kwargs,
        in_chans=in_chans,
        image_size=hparams.get("image_size"),
        data=hparams.get("data"),
    )


def _classes_in(state_dict: Mapping) -> int | None:
    """The classifier's output count in weights of any layout, or None when there is none."""
    try:
        head = to_repblocks_layout(state_dict).get("head.fc.weight")
    except Exception:  # not a state dict we can read; load_weights will say why
        return None
    return int(head.shape[0]) if isinstance(head, Tensor) and head.dim() == 2 else None


def _torchvision_network(source: str, num_classes: int, *, seed: int) -> Network:
    import torchvision  # ~1 s to import: only when asked for

    prefix, _, name = source.partition(":")
    if f"{prefix}:" != TORCHVISION or not name:
        raise DeployError(f"unknown source {source!r}; known: torchvision:NAME")
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise DeployError(f"unknown torchvision classification model {name!r}; known: {', '.join(known)}")

    def build() -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    model = randomize_bn_(build(), seed=seed).eval()
    # Folding a fresh model gives the structure of any folded one: where Conv+BN pairs become convs with bias.
    return Network(
        source,
        model,
        lambda: switch_to_deploy(build()),
        num_classes,
        origin="torchvision, random weights (weights=None), random BN statistics",
    )


@torch.inference_mode()
def verify(
    network: Network,
    plain: nn.Module,
    *,
    device: torch.device,
    image_shape: tuple[int, int, int],
    dtypes: tuple[str, ...],
    config: DeployConfig,
) -> dict:
    """Compare the deploy form with the train form on ``device``; raise :class:`DeployError` over tolerance.

    float32 is checked against ``verify.atol``/``rtol``. Each other dtype the benchmark runs is
    checked against the float32 train form: the deploy form may be no less accurate than the train
    form in that dtype (one fused conv rounds less than three branches), within ``rtol``.
    """
    with _ieee_fp32():
        return _verify(network, plain, device=device, image_shape=image_shape, dtypes=dtypes, config=config)


def _verify(
    network: Network,
    plain: nn.Module,
    *,
    device: torch.device,
    image_shape: tuple[int, int, int],
    dtypes: tuple[str, ...],
    config: DeployConfig,
) -> dict:
    settings = config.verify
    train, deploy = _on(network.model, device), _on(plain, device)
    generator = torch.Generator().manual_seed(config.seed)
    images = torch.randn(settings.batch_size, *image_shape, generator=generator).to(device)  # (B, C, H, W)
    reference, output = train(images), deploy(images)
    abs_err, rel_err = max_errors(reference, output)
    result = {
        "random_images": settings.batch_size,
        "max_abs_err": abs_err,
        "max_rel_err": rel_err,
        "top1_agreement": _agreement(reference, output),
        "atol": settings.atol,
        "rtol": settings.rtol,
    }
    result["real_images"] = _verify_real_images(network, train, deploy, device, settings.real_batches)
    real = result["real_images"]
    if isinstance(real, dict):
        result["max_abs_err"] = max(abs_err, real["max_abs_err"])
        result["max_rel_err"] = max(rel_err, real["max_rel_err"])
    if not within_tolerance(result["max_abs_err"], result["max_rel_err"], atol=settings.atol, rtol=settings.rtol):
        raise DeployError(
            f"the deploy form of {network.name} differs from the train form: max error {result['max_abs_err']:.2e} "
            f"abs, {result['max_rel_err']:.2e} rel (tolerance verify.atol={settings.atol:g}, verify.rtol={settings.rtol:g})"
            "; nothing was exported"
        )
    result["dtypes"] = _verify_dtypes(train, deploy, images, reference, dtypes, device, settings.rtol, network.name)
    log.info("verified %s: %.1e abs, %.1e rel", network.name, result["max_abs_err"], result["max_rel_err"])
    return result


def _on(model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    if device.type == "cpu" and dtype == torch.float32:
        return model
    return copy.deepcopy(model).to(device, dtype)  # nn.Module.to works in place; the caller's stays as it is


def _agreement(reference: Tensor, other: Tensor) -> float:
    return (reference.argmax(dim=1) == other.argmax(dim=1)).float().mean().item()


def _verify_real_images(
    network: Network, train: nn.Module, deploy: nn.Module, device: torch.device, max_batches: int
) -> dict | str:
    """Errors and accuracies on validation images, or why they were skipped."""
    if network.data is None or max_batches < 1:
        return (
            "skipped (no data config in the checkpoint)" if network.data is None else "skipped (verify.real_batches=0)"
        )
    try:
        from repblocks.data import build_datamodule
    except ImportError as err:
        return f"skipped (repblocks.data.build_datamodule is not available: {err})"
    try:
        datamodule = build_datamodule(network.data)
        datamodule.setup("validate")
        batches = list(itertools.islice(datamodule.val_dataloader(), max_batches))
    except (FileNotFoundError, ValueError) as err:
        return f"skipped ({err})"
    worst_abs = worst_rel = 0.0
    agree = train_correct = deploy_correct = count = 0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        train_logits, deploy_logits = train(images), deploy(images)
        abs_err, rel_err = max_errors(train_logits, deploy_logits)
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
        agree += (train_logits.argmax(1) == deploy_logits.argmax(1)).sum().item()
        train_correct += (train_logits.argmax(1) == labels).sum().item()
        deploy_correct += (deploy_logits.argmax(1) == labels).sum().item()
        count += labels.numel()
    if count == 0:
        return "skipped (the validation loader yielded no images)"
    return {
        "images": count,
        "max_abs_err": worst_abs,
        "max_rel_err": worst_rel,
        "top1_agreement": agree / count,
        "train_accuracy": train_correct / count,
        "deploy_accuracy": deploy_correct / count,
    }


def _verify_dtypes(
    train: nn.Module,
    deploy: nn.Module,
    images: Tensor,
    reference: Tensor,
    dtypes: tuple[str, ...],
    device: torch.device,
    rtol: float,
    name: str,
) -> dict:
    results = {}
    for dtype_name in dtypes:
        if dtype_name == "fp32" or applicable("eager", dtype_name, device) is not None:
            continue
        dtype = DTYPES[dtype_name]
        batch = images.to(dtype)
        train_rel = max_errors(reference, _on(train, device, dtype)(batch).float())[1]
        deploy_rel = max_errors(reference, _on(deploy, device, dtype)(batch).float())[1]
        results[dtype_name] = {"train_rel_err": train_rel, "deploy_rel_err": deploy_rel}
        if not deploy_rel <= 2 * train_rel + rtol:
            raise DeployError(
                f"in {dtype_name}, the deploy form of {name} is less accurate than the train form: "
                f"{deploy_rel:.2e} vs {train_rel:.2e} relative to float32; nothing was exported"
            )
    return results


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
        with _user_errors():  # an export that does not reproduce the model stops the run in one line
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
        with _cudnn_benchmark(bench.cudnn_benchmark):
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
            "environment": _environment(device),
        }
    report["files"] = {name: str(path) for name, path in write_speed_table(report, Path(config.out_dir)).items()}
    return report


def _speed_table_entries(name: str, image_shape: tuple[int, int, int], config: DeployConfig) -> dict[str, nn.Module]:
    """``{name: deploy form}``; a torchvision model also as it is (``{name: original, name folded: folded}``)."""
    with _user_errors():
        if name.startswith(TORCHVISION):
            network = _torchvision_network(name, 1000, seed=config.seed)
        else:
            network = _registry_network(name, randomize_bn_(create_model(name), seed=config.seed).eval(), origin="")
    plain = switch_to_deploy(network.model)
    images = torch.randn(2, *image_shape, generator=torch.Generator().manual_seed(config.seed))  # (2, C, H, W)
    with torch.inference_mode():
        abs_err, rel_err = max_errors(network.model(images), plain(images))
    if not within_tolerance(abs_err, rel_err, atol=config.verify.atol, rtol=config.verify.rtol):
        raise DeployError(
            f"the deploy form of {name} differs from the train form: {abs_err:.2e} abs, {rel_err:.2e} rel"
        )
    log.info("built and verified %s (%.1e rel)", name, rel_err)
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
def _ieee_fp32() -> Iterator[None]:
    """float32 convs and matmuls in full float32 precision, not TF32 (Ampere and later GPUs round to TF32 by
    default): verification measures the conversion's error, not TF32's ~1e-3."""
    backends = [torch.backends.cudnn.conv, torch.backends.cuda.matmul]
    previous = [backend.fp32_precision for backend in backends]
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, precision in zip(backends, previous, strict=True):
            backend.fp32_precision = precision


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
        "interleaved in one process"
    )


def _environment(device: torch.device) -> dict:
    import onnxruntime

    environment = {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        # "tf32": fp32 convs run in TF32 on Ampere and later, as PyTorch does by default (the paper's 1080Ti cannot).
        environment["fp32_conv_precision"] = torch.backends.cudnn.conv.fp32_precision
    return environment
