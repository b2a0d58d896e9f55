"""int8 post-training quantization of the deploy form, gated on validation accuracy (``quantize=int8``).

The stage reads top to bottom:

1. images: calibration images (the run's own training images, prepared as for evaluation and
   drawn at random, or ``quantize.calibration=DIR``) and a loader of labelled validation images,
   read a batch at a time: the run's own, or ``quantize.validation=DIR`` (ImageFolder layout,
   :mod:`repblocks.deploy.labelled_folder`), so that weights from anywhere can be gated. Without
   either, int8 is refused: an int8 model nobody measured is not shipped;
2. each engine of ``quantize.engines`` quantizes the deploy form on its own, in its own module of
   :mod:`repblocks.deploy.engines` (:meth:`~repblocks.deploy.engines.base.Engine.int8`): NNCF into
   OpenVINO (the same int8 as QAT's baseline), onnxruntime's static QDQ quantizer with per-channel
   weights, (with ``export.formats=[...,executorch]``, or by name) PT2E with XNNPACK's quantizer,
   lowered to a ``.pte`` and judged as ExecuTorch runs it, and (opt-in, extra ``[litert]``)
   litert_torch's PT2E quantizer into a ``.tflite``;
3. the gate: top-1 of fp32 and int8 on the validation images. An engine whose int8 model loses
   more than ``quantize.max_drop`` points fails; for OpenVINO, NNCF's accuracy-control mode then
   tries again, keeping the layers that cost most in fp32
   (:meth:`~repblocks.deploy.engines.base.Engine.int8_with_accuracy_control`). When no engine passes, the run stops
   with one line naming the drops, before anything is written. An fp32 top-1 near chance
   (:func:`repblocks.int8.near_chance`) is warned about in the log and the report: a gate passed
   by a model that learned nothing says nothing;
4. reduced float precisions (``quantize.floats``: bf16, fp16), for each engine of ``quantize.engines``
   whose registry entry lists them (OpenVINO's), judged by the same gate (:func:`gate_floats`), each
   only where the engine runs it natively here, else skipped with the engine's reason
   (:meth:`~repblocks.deploy.engines.base.Engine.float_missing`);
5. per-layer quantization error of the worst layers, where the engine measures it (onnxruntime's
   QDQ debugger: the SQNR of each layer's output in the int8 model against the fp32 model).

Quantizing the deploy form, not the train form, is the point of re-parameterization: one conv
per block has one weight range per channel to fit, where the train form's branches would be
quantized apart and summed (``benchmarks/int8_accuracy.py`` measures both).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from repblocks.datasets import IMAGE_SUFFIXES, ImageFiles, build_data, eval_transform, evaluation_loader, sample_images
from repblocks.deploy.config import QUANT_ENGINES, QuantizeConfig
from repblocks.deploy.engines import by_name, engine
from repblocks.deploy.engines.base import Int8Artifact, Int8Model
from repblocks.deploy.export import int8_metadata
from repblocks.deploy.labelled_folder import validation_folder
from repblocks.deploy.preprocessing import describe_sources
from repblocks.deploy.sources import Network
from repblocks.errors import UserError
from repblocks.int8 import agreement, chance_top1, near_chance, predict_batches
from repblocks.int8 import top1 as _top1

__all__ = [
    "IMAGE_SUFFIXES",
    "Gate",
    "GateImages",
    "Int8Model",
    "Quantization",
    "gate_floats",
    "gate_images",
    "int8_runner",
    "quantize",
]

log = logging.getLogger(__name__)


@dataclass
class Quantization:
    """What ``quantize=int8`` found: the images it used, fp32 top-1, and each engine's int8 model."""

    calibration: dict  # source and number of images
    evaluation: dict  # what the gate measured on (source, images, preprocessing), fp32 top-1, near_chance
    models: dict[str, Int8Model]
    skipped: list[dict]  # engines not run, and why

    @property
    def passed(self) -> dict[str, Int8Model]:
        return {name: model for name, model in self.models.items() if model.passed}

    def summary(self) -> dict:
        """Plain data for the report (no models)."""
        engines = {
            name: {
                "method": m.method,
                "top1": m.top1,
                "drop": m.drop,
                "top1_agreement": m.agreement,
                "passed": m.passed,
                "fp32_layers": m.fp32_layers,
                "worst_layers": m.worst_layers,
            }
            for name, m in self.models.items()
        }
        return {
            "calibration": self.calibration,
            "evaluation": self.evaluation,
            "engines": engines,
            "skipped": self.skipped,
        }


def quantize(network: Network, plain: nn.Module, settings: QuantizeConfig, *, seed: int = 0) -> Quantization:
    """Quantize ``plain`` (the deploy form) with every engine of ``settings`` and gate each on accuracy.

    Raises:
        UserError: A setting that cannot be met (no calibration or validation images, an engine
            not installed), or no engine's int8 model is within ``settings.max_drop`` of fp32.
    """
    engines, skipped = _engines(settings)
    images = gate_images(network, settings, seed=seed)
    calibration = images.calibration
    gate = Gate.of(_eager(plain), images.batches, settings.max_drop)
    fp32_top1, labels = gate.fp32_top1, gate.labels
    log.info(
        "int8: calibrating on %d images, gating on %d validation images of %s, prepared as: %s (fp32 top-1 %.2f%%)",
        len(calibration),
        len(labels),
        images.evaluation["source"],
        images.evaluation["preprocessing"],
        fp32_top1,
    )
    useless = near_chance(fp32_top1, network.num_classes)
    if useless:
        log.warning("int8 gate: %s", useless)
    metadata = int8_metadata(network)
    models = {name: _gated(name, plain, calibration, gate, settings, metadata) for name in engines}
    # Every engine listed, installed or not: one that is not says so for each of its precisions (float_missing).
    floats, float_skipped = gate_floats(plain, calibration, gate, dict.fromkeys(settings.engines), settings.floats)
    models, skipped = {**models, **floats}, [*skipped, *float_skipped]
    quantization = Quantization(
        calibration=images.calibration_info,
        evaluation={
            **images.evaluation,
            "images": len(labels),
            "fp32_top1": fp32_top1,
            "max_drop": settings.max_drop,
            "chance_top1": chance_top1(network.num_classes),
            "near_chance": useless,  # None, or the warning
        },
        models=models,
        skipped=skipped,
    )
    if not quantization.passed:
        drops = ", ".join(f"{m.key} {m.top1:.2f}% ({m.drop:+.2f} points)" for m in models.values())
        raise UserError(
            f"int8 loses more top-1 than quantize.max_drop={settings.max_drop:g} allows: fp32 {fp32_top1:.2f}%, "
            f"int8 {drops} on {len(labels)} validation images of {images.evaluation['source']}; nothing was written"
        )
    return quantization


def _engines(settings: QuantizeConfig) -> tuple[list[str], list[dict]]:
    """The engines to run; one not installed is skipped with the reason when another engine is listed."""
    engines, skipped = list(dict.fromkeys(settings.engines)), []
    if not engines:
        raise UserError(f"quantize.engines is empty; known: {', '.join(QUANT_ENGINES)}")
    for name in list(engines):
        quantizer = engine(name)
        reason = quantizer.missing()
        if reason:
            if engines == [name]:
                raise UserError(f"quantize.engines=[{name}] needs {quantizer.title}, but {reason}")
            engines.remove(name)
            skipped.append({"what": f"{name} int8", "reason": reason})
    return engines, skipped


def _gated(
    name: str, plain: nn.Module, calibration: Tensor, gate: Gate, settings: QuantizeConfig, metadata: dict[str, str]
) -> Int8Model:
    """``name``'s int8 model of ``plain``, judged by ``gate``; once more with its accuracy control when that fails."""
    quantizer = engine(name)
    artifact = quantizer.int8(plain, calibration, metadata=metadata, worst_layers=settings.worst_layers)
    result = gate.judge(name, artifact)
    if result.passed or not settings.accuracy_control:
        return result
    log.info("int8: %s loses %.2f points; trying its accuracy control", name, result.drop)
    controlled = quantizer.int8_with_accuracy_control(plain, calibration, gate.batches, max_drop=settings.max_drop)
    return result if controlled is None else gate.judge(name, controlled)


def gate_floats(
    plain: nn.Module, calibration: Tensor, gate: Gate, engines: Iterable[str], precisions: Iterable[str]
) -> tuple[dict[str, Int8Model], list[dict]]:
    """Each of ``precisions`` run by each of ``engines`` that lists it, judged by ``gate`` as int8 is.

    Returns:
        ``{"<engine>_<precision>": result}``, and what was skipped, saying why: a precision the engine
        does not run natively here, or one no engine of ``engines`` runs.
    """
    results, skipped = {}, []
    for precision in dict.fromkeys(precisions):
        offering = [name for name in engines if precision in by_name(name).floats]
        if not offering:
            reason = f"none of quantize.engines ({', '.join(engines) or 'none'}) runs {precision}"
            log.info("%s: skipped: %s", precision, reason)
            skipped.append({"what": precision, "reason": reason})
        for name in offering:
            runner = engine(name)
            reason = runner.float_missing(precision)
            if reason:
                log.info("%s %s: skipped: %s", name, precision, reason)
                skipped.append({"what": f"{name} {precision}", "reason": reason})
                continue
            result = gate.judge(name, runner.low_precision(plain, calibration, precision), precision=precision)
            results[result.key] = result
    return results, skipped


# -- images ------------------------------------------------------------------------------------------------


@dataclass
class GateImages:
    """What ``quantize=int8`` reads: calibration images, labelled validation batches, and where each came from."""

    calibration: Tensor  # (N, C, H, W), prepared as the model expects
    batches: Iterable[tuple[Tensor, Tensor]]  # (images, output index) a batch at a time
    calibration_info: dict  # source, images
    evaluation: dict  # source, images, preprocessing (and the class mapping of a folder)


def gate_images(network: Network, settings: QuantizeConfig, *, seed: int = 0) -> GateImages:
    """The calibration images and the validation batches of the gate (the run's own, or the folders given).

    Raises:
        UserError: Nothing to gate on (no run data and no ``quantize.validation``), nothing to
            calibrate on, or images that cannot be read.
    """
    data = _data(network, settings)
    calibration, calibration_info = _calibration_images(data, network, settings, seed)
    batches, evaluation = _validation_batches(data, network, settings, seed)
    return GateImages(calibration, batches, calibration_info, evaluation)


def _calibration_images(data, network: Network, settings: QuantizeConfig, seed: int) -> tuple[Tensor, dict]:
    if settings.calibration is not None:
        return _folder_images(Path(settings.calibration).expanduser(), network, settings.calibration_images, seed)
    images = sample_images(data.calibration_set, settings.calibration_images, seed=seed)
    return images, {"source": "the run's training images (no augmentation)", "images": len(images)}


def _validation_batches(data, network: Network, settings: QuantizeConfig, seed: int) -> tuple[object, dict]:
    """The labelled images the gate reads, a batch at a time (``quantize.eval_images`` of them), and what they are."""
    if settings.validation is not None:
        batches, info = validation_folder(
            settings.validation,
            preprocessing=network.preprocessing,
            num_classes=network.num_classes,
            class_names=settings.class_names,
            count=settings.eval_images,
            seed=seed,
        )
        where = describe_sources(network.preprocessing)
        return batches, {**info, "preprocessing": f"{_describe_preprocessing(network.preprocessing)} ({where})"}
    if not len(data.val_set):
        raise UserError("quantize=int8 checks int8 top-1 on validation images, but the run's validation set is empty")
    name = str(network.data.get("_target_", "")).rpartition(".")[2]
    root = network.data.get("root")
    info = {
        "source": f"the run's validation images ({name}{f' in {root}' if root else ''})",
        "preprocessing": f"{_describe_preprocessing(data.preprocessing)} (the run's data set)",
    }
    return evaluation_loader(data, settings.eval_images, seed=seed), info


def _data(network: Network, settings: QuantizeConfig):
    """The run's data set, set up, when the gate or calibration reads it; None when the folders given are enough."""
    if settings.validation is not None and settings.calibration is not None:
        return None
    if network.data is None:
        what = network.origin or network.name
        if settings.validation is None:
            raise UserError(
                f"quantize=int8 gates int8 on labelled validation images, but {what} names no data set: pass "
                "quantize.validation=DIR (one subfolder of images per class) and quantize.calibration=DIR "
                "(any images), or deploy a train.py checkpoint or run folder"
            )
        raise UserError(
            f"quantize=int8 calibrates on images, but {what} names no data set: pass quantize.calibration=DIR "
            "(a folder of images, unlabelled; not the validation folder, which the gate measures on)"
        )
    try:
        data = build_data(network.data)
        data.setup("validate")
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise UserError(f"quantize=int8 reads the run's images, but they cannot be read: {err}") from None
    return data


def _describe_preprocessing(preprocessing: dict) -> str:
    """``"shorter side to 256 (bilinear), centre crop 224x224, mean [...], std [...]"``: how the gate's images were prepared."""
    size = preprocessing["input_size"][-1]  # the side eval_transform crops, square
    resize = round(size / preprocessing["crop_pct"])
    mean = ", ".join(f"{x:.3f}" for x in preprocessing["mean"])
    std = ", ".join(f"{x:.3f}" for x in preprocessing["std"])
    return (
        f"shorter side to {resize} ({preprocessing['interpolation']}), centre crop {size}x{size}, "
        f"mean [{mean}], std [{std}]"
    )


def _folder_images(folder: Path, network: Network, count: int, seed: int) -> tuple[Tensor, dict]:
    """Up to ``count`` images found under ``folder``, prepared as ``network.preprocessing`` says, and what was read."""
    try:
        files = ImageFiles(folder, transform=eval_transform(network.preprocessing))
    except FileNotFoundError:
        raise UserError(f"quantize.calibration: {folder} is not a folder of images") from None
    if not len(files):
        raise UserError(f"quantize.calibration: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    try:
        images = sample_images(files, count, seed=seed)  # (N, 3, H, W)
    except ValueError as err:
        raise UserError(f"quantize.calibration: {err}") from None
    if files.skipped:
        log.info("quantize.calibration: skipped %d files under %s that are not images", files.skipped, folder)
    channels = network.preprocessing["input_size"][0]
    images = images[:, :channels] if channels < 3 else images
    return images, {"source": str(folder), "images": len(images), "skipped_files": files.skipped}


# -- the gate ----------------------------------------------------------------------------------------------


def int8_runner(engine_name: str, model: nn.Module, calibration: Tensor) -> Callable[[Tensor], Tensor]:
    """``model`` quantized by ``engine_name`` (``openvino``, ``onnxruntime``, ``executorch``, ...), as images -> logits."""
    return engine(engine_name).int8(model, calibration, metadata={}).run


@dataclass
class Gate:
    """The validation batches, fp32's logits on them and the most top-1 int8 may lose.

    The images are read a batch at a time from ``batches`` (a loader) each time a model is judged:
    never all in memory at once.
    """

    batches: Iterable[tuple[Tensor, Tensor]]  # (images (B, C, H, W), labels (B,)), in the same order each time
    labels: Tensor  # (N,)
    fp32: Tensor  # (N, classes)
    max_drop: float

    @classmethod
    def of(cls, fp32: Callable[[Tensor], Tensor], batches: Iterable[tuple[Tensor, Tensor]], max_drop: float) -> Gate:
        """The gate of ``batches``, with ``fp32``'s logits on them as the reference."""
        logits, labels = predict_batches(fp32, batches)
        return cls(batches, labels, logits, max_drop)

    @property
    def fp32_top1(self) -> float:
        return _top1(self.fp32, self.labels)

    def judge(self, engine: str, int8: Int8Artifact, *, precision: str = "int8") -> Int8Model:
        """``int8`` (``engine``'s, at ``precision``) against fp32 on the validation batches: passed when it loses at
        most ``max_drop`` points."""
        logits, _ = predict_batches(int8.run, self.batches)
        top1 = _top1(logits, self.labels)
        drop = self.fp32_top1 - top1
        passed = drop <= self.max_drop
        log.info(
            "%s %s: top-1 %.2f%% (fp32 %.2f%%, drop %.2f points): %s",
            precision,
            engine,
            top1,
            self.fp32_top1,
            drop,
            "passed" if passed else "failed",
        )
        return Int8Model(
            engine,
            int8.method,
            int8.model,
            int8.run,
            top1=top1,
            drop=drop,
            agreement=agreement(logits, self.fp32),
            passed=passed,
            fp32_layers=int8.fp32_layers,
            worst_layers=int8.worst_layers,
            precision=precision,
        )


def _eager(model: nn.Module) -> Callable[[Tensor], Tensor]:
    return torch.inference_mode()(model)
