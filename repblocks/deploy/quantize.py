"""int8 post-training quantization of the deploy form, gated on validation accuracy (``quantize=int8``).

The stage reads top to bottom:

1. images: calibration images (the run's own training images, prepared as for evaluation and
   drawn at random, or ``quantize.calibration=DIR``) and a loader of labelled validation images,
   read a batch at a time: the run's own, or ``quantize.validation=DIR`` (ImageFolder layout,
   :mod:`repblocks.deploy.labelled_folder`), so that weights from anywhere can be gated. Without
   either, int8 is refused: an int8 model nobody measured is not shipped;
2. each engine of ``quantize.engines`` quantizes the deploy form on its own: NNCF into OpenVINO
   (:func:`repblocks.int8.nncf_int8`, the same int8 as QAT's baseline), onnxruntime's static
   QDQ quantizer with per-channel weights (:func:`onnxruntime_int8`), (with
   ``export.formats=[...,executorch]``, or by name) PT2E with XNNPACK's quantizer, lowered to a ``.pte``
   and judged as ExecuTorch runs it (:func:`repblocks.deploy.executorch.quantize_int8`), and (opt-in, extra
   ``[litert]``) litert_torch's PT2E quantizer into a ``.tflite`` (:func:`repblocks.deploy.litert.int8`);
3. the gate: top-1 of fp32 and int8 on the validation images. An engine whose int8 model loses
   more than ``quantize.max_drop`` points fails; for OpenVINO, NNCF's accuracy-control mode then
   tries again, keeping the layers that cost most in fp32. When no engine passes, the run stops
   with one line naming the drops, before anything is written. An fp32 top-1 near chance
   (:func:`repblocks.int8.near_chance`) is warned about in the log and the report: a gate passed
   by a model that learned nothing says nothing;
4. per-layer quantization error of the worst layers (onnxruntime's QDQ debugger: the SQNR of each
   layer's output in the int8 model against the fp32 model on the same images).

Quantizing the deploy form, not the train form, is the point of re-parameterization: one conv
per block has one weight range per channel to fit, where the train form's branches would be
quantized apart and summed (``benchmarks/int8_accuracy.py`` measures both).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from repblocks.datasets import IMAGE_SUFFIXES, ImageFiles, build_data, eval_transform, evaluation_loader, sample_images
from repblocks.deploy import executorch, litert, low_precision, openvino
from repblocks.deploy.config import QUANT_ENGINES, QuantizeConfig
from repblocks.deploy.export import export_onnx, int8_metadata, onnx_session
from repblocks.deploy.labelled_folder import validation_folder
from repblocks.deploy.preprocessing import describe_sources
from repblocks.deploy.sources import Network
from repblocks.errors import UserError
from repblocks.int8 import (
    NNCF_OPTIONS,
    agreement,
    chance_top1,
    example_batch,
    near_chance,
    nncf_dataset,
    nncf_int8,
    predict_batches,
)
from repblocks.int8 import top1 as _top1
from repblocks.int8.accuracy import BATCH as _BATCH

__all__ = [
    "IMAGE_SUFFIXES",
    "Gate",
    "GateImages",
    "Int8Model",
    "Quantization",
    "gate_images",
    "int8_runner",
    "onnxruntime_int8",
    "quantize",
]

log = logging.getLogger(__name__)


@dataclass
class Int8Model:
    """One engine's int8 model and how it did at the gate."""

    engine: str  # "openvino", "onnxruntime" or "executorch"
    method: str  # how it was quantized, for the report
    model: object  # an openvino.Model, the QDQ ONNX file's bytes, or the .pte's bytes
    run: Callable[[Tensor], Tensor]  # images (B, C, H, W) -> logits (B, classes)
    top1: float  # percent
    drop: float  # fp32 top-1 minus int8 top-1, in points
    agreement: float  # fraction of validation images where int8 and fp32 predict the same class
    passed: bool
    fp32_layers: list[str] = field(default_factory=list)  # kept in fp32 by accuracy control
    worst_layers: list[dict] = field(default_factory=list)


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
    quantizers = {
        "openvino": _openvino,
        "onnxruntime": _onnxruntime,
        # The .pte carries its metadata inside: it goes in when lowered, so the program gated is the file written.
        "executorch": functools.partial(_executorch, metadata=int8_metadata(network)),
        "litert": _litert,
    }
    models = {engine: quantizers[engine](plain, calibration, gate, settings) for engine in engines}
    # HOOK(low_precision): bf16/fp16 judged by the same gate; skipped with the reason on CPUs without them.
    floats, float_skipped = low_precision.gate_floats(plain, calibration, gate, settings.floats)
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
        drops = ", ".join(f"{m.engine} {m.top1:.2f}% ({m.drop:+.2f} points)" for m in models.values())
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
    for engine, package in (("openvino", openvino), ("executorch", executorch), ("litert", litert)):
        reason = package.missing() if engine in engines else None
        if reason:
            if engines == [engine]:
                raise UserError(f"quantize.engines=[{engine}] needs {_NAMES[engine]}, but {reason}")
            engines.remove(engine)
            skipped.append({"what": f"{engine} int8", "reason": reason})
    return engines, skipped


_NAMES = {"openvino": "OpenVINO", "executorch": "ExecuTorch", "litert": "LiteRT"}


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


# -- engines -----------------------------------------------------------------------------------------------


def onnxruntime_int8(
    model: nn.Module, calibration: Tensor, workdir: Path, *, per_channel: bool = True
) -> tuple[Path, Path]:
    """``model`` quantized by onnxruntime's static quantizer: QDQ, int8 weights (per channel), uint8 activations.

    ``per_channel=False``: one weight scale per layer, as TensorRT's implicit int8 and many NPUs use;
    where RepVGG's fused kernels, with their per-channel ranges far apart, are known to break.

    Returns:
        The float32 model as quantized (after onnxruntime's pre-processing) and the QDQ model, both in ``workdir``.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, prepared, int8_path = workdir / "fp32.onnx", workdir / "prepared.onnx", workdir / "int8.onnx"
    export_onnx(model, fp32_path, example_batch(calibration), atol=1e-3, rtol=1e-3, dynamic_size=True)
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(int8_path),
        _reader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return prepared, int8_path


def int8_runner(
    engine: str, model: nn.Module, calibration: Tensor, workdir: Path, **options
) -> Callable[[Tensor], Tensor]:
    """``model`` quantized by ``engine`` (``openvino``, ``onnxruntime``, ``executorch``), as images -> logits."""
    if engine == "openvino":
        return _ov_run(nncf_int8(model, calibration))
    if engine == "executorch":
        return _et_run(executorch.quantize_int8(model, calibration))
    _, int8_path = onnxruntime_int8(model, calibration, workdir, **options)
    return _ort_run(onnx_session(int8_path.read_bytes()))


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

    def judge(self, engine: str, method: str, model: object, run: Callable[[Tensor], Tensor]) -> Int8Model:
        logits, _ = predict_batches(run, self.batches)
        top1 = _top1(logits, self.labels)
        drop = self.fp32_top1 - top1
        passed = drop <= self.max_drop
        log.info(
            "int8 %s: top-1 %.2f%% (fp32 %.2f%%, drop %.2f points): %s",
            engine,
            top1,
            self.fp32_top1,
            drop,
            "passed" if passed else "failed",
        )
        return Int8Model(
            engine, method, model, run, top1=top1, drop=drop, agreement=agreement(logits, self.fp32), passed=passed
        )


def _openvino(plain: nn.Module, calibration: Tensor, gate: Gate, settings: QuantizeConfig) -> Int8Model:
    """NNCF's post-training quantization into OpenVINO; its accuracy control when that fails the gate."""
    quantized = nncf_int8(plain, calibration)
    result = gate.judge("openvino", "NNCF post-training (bias correction), OpenVINO", quantized, _ov_run(quantized))
    if result.passed or not settings.accuracy_control:
        return result
    log.info("int8: openvino loses %.2f points; trying NNCF's accuracy control", result.drop)
    import nncf

    def validate(compiled, items) -> float:  # NNCF's drop is a fraction, ours in points
        logits = torch.cat([torch.from_numpy(np.array(compiled(images.numpy())[0])) for images, _ in items])
        return _top1(logits, torch.cat([labels for _, labels in items])) / 100

    controlled = nncf.quantize_with_accuracy_control(
        openvino.to_openvino(plain, calibration, dynamic_size=True),
        nncf_dataset(calibration),
        nncf.Dataset(gate.batches, lambda batch: batch[0].numpy()),  # items (images, labels); the model reads images
        validate,
        max_drop=settings.max_drop / 100,
        subset_size=len(calibration),
        **NNCF_OPTIONS,
    )
    kept = [
        op.get_friendly_name()
        for op in controlled.get_ops()
        if op.get_type_name() == "Convolution" and not _quantized(op)
    ]
    method = f"NNCF accuracy control, OpenVINO ({len(kept)} convolutions kept in fp32)"
    result = gate.judge("openvino", method, controlled, _ov_run(controlled))
    result.fp32_layers = kept
    return result


def _onnxruntime(plain: nn.Module, calibration: Tensor, gate: Gate, settings: QuantizeConfig) -> Int8Model:
    with tempfile.TemporaryDirectory(prefix="repblocks-int8-") as tmp:
        prepared, int8_path = onnxruntime_int8(plain, calibration, Path(tmp))
        model_bytes = int8_path.read_bytes()
        run = _ort_run(onnx_session(model_bytes))
        result = gate.judge("onnxruntime", "onnxruntime static QDQ, per-channel weights", model_bytes, run)
        if settings.worst_layers:
            result.worst_layers = _worst_layers(prepared, int8_path, calibration[: 2 * _BATCH], settings.worst_layers)
    return result


def _litert(plain: nn.Module, calibration: Tensor, gate: Gate, settings: QuantizeConfig) -> Int8Model:
    """litert_torch's PT2E quantizer (static, per-channel weights) into a ``.tflite``, run by LiteRT's interpreter."""
    model_bytes = litert.int8(plain, calibration)
    with tempfile.TemporaryDirectory(prefix="repblocks-int8-") as tmp:
        path = Path(tmp) / "int8.tflite"
        path.write_bytes(model_bytes)
        run = litert.load(path)  # the interpreter keeps what it read: the folder may go
    method = "litert_torch PT2E static, per-channel weights, LiteRT"
    return gate.judge("litert", method, model_bytes, lambda batch: torch.from_numpy(run(batch.numpy())))


def _executorch(
    plain: nn.Module, calibration: Tensor, gate: Gate, settings: QuantizeConfig, *, metadata: dict[str, str]
) -> Int8Model:
    """PT2E with XNNPACK's quantizer, lowered to a ``.pte``; judged as ExecuTorch runs that program."""
    program = executorch.quantize_int8(plain, calibration, metadata=metadata)
    method = "PT2E XNNPACKQuantizer (per-channel weights), ExecuTorch XNNPACK"
    return gate.judge("executorch", method, program, _et_run(program))


def _reader(images: Tensor):
    """onnxruntime's calibration data reader over ``images``, a batch at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(images.split(_BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.numpy()}

    return Reader()


def _quantized(op) -> bool:
    """Whether a convolution's weights come through a FakeQuantize or an int8 constant: NNCF quantized it."""
    weights = op.input(1).get_source_output().get_node()
    while weights.get_type_name() in ("Convert", "Multiply", "Subtract", "Reshape"):
        weights = weights.input(0).get_source_output().get_node()
    precision = weights.get_output_element_type(0).get_type_name()
    return weights.get_type_name() in ("FakeQuantize", "FakeConvert") or precision in ("i8", "u8")


def _ov_run(ov_model) -> Callable[[Tensor], Tensor]:
    return openvino.infer(openvino.compile_model(ov_model))


def _et_run(program: bytes) -> Callable[[Tensor], Tensor]:
    return executorch.runner(program, name="the int8 ExecuTorch program")


def _ort_run(session) -> Callable[[Tensor], Tensor]:
    name = session.get_inputs()[0].name
    return lambda batch: torch.from_numpy(np.asarray(session.run(None, {name: batch.numpy()})[0]))


def _worst_layers(fp32_path: Path, int8_path: Path, images: Tensor, count: int) -> list[dict]:
    """The ``count`` layer outputs with the lowest SQNR (dB) in the int8 model against the fp32 one."""
    from onnxruntime.quantization import qdq_loss_debug as debug

    activations = {}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        augmented = path.with_name(f"{name}-debug.onnx")
        debug.modify_model_output_intermediate_tensors(str(path), str(augmented))
        activations[name] = debug.collect_activations(str(augmented), _reader(images))
    errors = debug.compute_activation_error(debug.create_activation_matching(activations["int8"], activations["fp32"]))
    modules = _producing_modules(fp32_path)
    layers = [
        {"layer": modules[name], "tensor": name, "sqnr_db": float(err["xmodel_err"])}
        for name, err in errors.items()
        if name in modules and "xmodel_err" in err
    ]
    return sorted(layers, key=lambda layer: layer["sqnr_db"])[:count]


def _producing_modules(path: Path) -> dict[str, str]:
    """``{tensor: module name}`` for the outputs of the layers (Relu, Conv, Gemm), from the exporter's name scopes."""
    import ast

    import onnx

    names = {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type not in ("Relu", "Conv", "Gemm"):
            continue
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
        scopes = ast.literal_eval(scopes) if scopes else [node.name]
        names[node.output[0]] = scopes[-2] if len(scopes) > 1 else scopes[-1]  # the module, not the op
    return names


# -- the gate ----------------------------------------------------------------------------------------------


def _eager(model: nn.Module) -> Callable[[Tensor], Tensor]:
    return torch.inference_mode()(model)
