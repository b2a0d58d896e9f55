"""Quantization-aware fine-tuning of a finished run, deployed as an int8 OpenVINO IR (``+experiment=qat``).

    python train.py model=qarepvgg_a0 +experiment=qat qat.init=outputs/train/RUN

It reads top to bottom:

1. the run: ``qat.init`` (a train.py run folder, whose best checkpoint is taken, or one of its
   checkpoints), read with ``weights_only=True``; it must be a run of ``model=``;
2. the fused network: ``switch_to_deploy(keep_post_bn=True)``. QARepVGG keeps the BatchNorm after
   its branch sum as a module of its own, which goes on training (and folds into the int8 conv's
   per-channel scale when OpenVINO compiles it); RepVGG, which has none, becomes a plain conv stack;
3. fake quantization: NNCF's post-training quantization of the torch module
   (:func:`repblocks.int8.fake_quantize`, on NNCF's pure-torch quantizers: nothing is compiled),
   calibrated on ``qat.calibration_images`` of the run's training images prepared as for evaluation;
4. fine-tuning for ``qat.epochs`` on the run's training data, through the same LightningModule as
   training (no EMA, no checkpoints: a few epochs at a low learning rate);
5. the int8 IR: ``openvino.convert_model`` of the fine-tuned model, saved, read back and checked
   against the fake-quantized torch model on the validation images (top-1 agreement at least
   ``qat.min_agreement``; the largest logit difference is reported);
6. the comparison, on the run's validation images: top-1 (percent) of the fused fp32 network, of
   NNCF's post-training int8 of it (same calibration images; :func:`repblocks.int8.nncf_int8`, the
   int8 ``deploy.py quantize=int8`` ships), and of the QAT int8 IR. An fp32 top-1 near chance
   (:func:`repblocks.int8.near_chance`) is warned about in the log, ``metrics.json`` and the summary:
   int8 "keeping" the accuracy of a model that learned nothing proves nothing.

The run's own data config is used (its training images, its validation split), whatever ``data=``
says. Outputs go into this command's run folder, only once every check has passed: ``int8/``
(``model.xml`` and ``model.bin``, renamed into place as one folder), then ``config.yaml`` and
``metrics.json``, each written atomically. OpenVINO and NNCF (``pip install repblocks[openvino]``)
are imported inside the functions that use them, so ``repblocks.train`` imports without them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from repblocks.convert import switch_to_deploy
from repblocks.datasets import ClassificationData, build_data, sample_images
from repblocks.errors import Interrupted, UserError
from repblocks.files import atomic_path, staged_folder
from repblocks.int8 import (
    agreement,
    compile_model,
    core,
    fake_quantize,
    infer,
    near_chance,
    nncf_int8,
    predict_batches,
    to_openvino,
    top1,
)
from repblocks.int8.accuracy import Logits
from repblocks.numerics import max_errors
from repblocks.run_checkpoint import RunCheckpoint, build_run_model, read_run_checkpoint, run_record
from repblocks.train.data import ClassificationDataModule
from repblocks.train.loggers import build_loggers
from repblocks.train.module import RepClassifier
from repblocks.train.progress import progress_callbacks
from repblocks.train.run_folder import check_run_folder

__all__ = ["INT8_DIR", "QATSettings", "quantization_aware_training", "summary"]

log = logging.getLogger(__name__)

INT8_DIR = "int8"  # the IR's folder in the run folder: model.xml and model.bin
_INSTALL = "pip install repblocks[openvino]"


@dataclass(frozen=True)
class QATSettings:
    """The ``qat`` node of the config (``configs/experiment/qat.yaml``)."""

    init: str  # the finished run (folder or checkpoint) to fine-tune
    epochs: int = 3  # fine-tuning epochs with fake quantization
    calibration_images: int = 300  # training images that set the initial ranges, for PTQ and QAT alike
    min_agreement: float = 0.99  # fraction of validation images on which the IR must predict the torch model's class

    @classmethod
    def from_config(cls, node: DictConfig) -> QATSettings:
        """Read and check the ``qat`` node.

        Raises:
            ValueError: A setting missing or out of range; one line naming it.
        """
        settings = OmegaConf.to_container(node, resolve=True)
        unknown = sorted(set(settings) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown qat setting {unknown[0]!r}; known: {', '.join(cls.__dataclass_fields__)}")
        if not settings.get("init"):
            raise ValueError("qat.init is not set: pass qat.init=RUN, a finished train.py run folder or its checkpoint")
        settings = cls(**settings)
        if settings.epochs < 1:
            raise ValueError(f"qat.epochs must be at least 1, got {settings.epochs}")
        if settings.calibration_images < 1:
            raise ValueError(f"qat.calibration_images must be at least 1, got {settings.calibration_images}")
        if not 0.0 <= settings.min_agreement <= 1.0:
            raise ValueError(f"qat.min_agreement must be between 0 and 1, got {settings.min_agreement}")
        return settings


def quantization_aware_training(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune ``qat.init``'s fused network with fake quantization, export the int8 IR, compare it with PTQ.

    Returns the metrics written to ``metrics.json``: top-1 (percent) of ``fp32``, ``ptq_int8``, ``qat_start``
    (the fake-quantized torch model before fine-tuning), ``qat_fake_quant`` (after) and ``qat_int8`` (the IR),
    the IR check, the images used and where the IR is. Raises ValueError, FileNotFoundError or UserError, one
    line and nothing written, for bad settings, a ``qat.init`` that is not a run of ``model=``, OpenVINO or
    NNCF missing, or an IR that disagrees with the torch model.
    """
    settings = QATSettings.from_config(cfg.qat)
    output_dir = Path(cfg.paths.output_dir)
    _check_folder(cfg, output_dir)
    run = _read_init(settings.init, model_name=cfg.model.name)
    _require_openvino()
    L.seed_everything(cfg.seed, workers=True)
    data = build_data(run.data)
    data.setup("fit")
    calibration = _calibration_images(data, settings.calibration_images, seed=cfg.seed)  # (N, C, H, W)
    log.info("qat: %s from %s, %d calibration images", run.model_name, run.path, len(calibration))
    start = _start(build_run_model(run), data, calibration, num_classes=run.num_classes)
    started = time.perf_counter()
    trainer = _fine_tune(start.quantized, run=run, data=data, cfg=cfg)
    train_time_s = time.perf_counter() - started
    quantized = start.quantized.cpu().float().eval()
    fake_quant_logits = _logits(_torch_predictor(quantized), data)[0]
    accuracy = {**start.accuracy, "qat_fake_quant": top1(fake_quant_logits, start.labels)}
    if trainer.fast_dev_run:  # a smoke test: nothing is exported or written
        return {"fast_dev_run": True, "top1": accuracy, "val_images": len(start.labels), "near_chance": start.useless}
    ir_logits, ir_check = _export(quantized, calibration, data, fake_quant_logits, settings, output_dir / INT8_DIR)
    accuracy["qat_int8"] = top1(ir_logits, start.labels)
    metrics = {
        "val_acc": accuracy["qat_int8"] / 100,  # what main() returns, for Hydra's sweepers: a fraction, as in training
        "top1": accuracy,
        "ir_check": ir_check,
        "int8_ir": str(output_dir / INT8_DIR / "model.xml"),
        **_facts(run, start, trainer, calibration_images=len(calibration), train_time_s=train_time_s),
    }
    _write(cfg, metrics, output_dir)
    return metrics


def _facts(run: RunCheckpoint, start: _Start, trainer: L.Trainer, **counts: float) -> dict[str, Any]:
    """What the comparison was made on and how long fine-tuning took, for ``metrics.json``."""
    return {
        "init": str(run.path),
        "model": run.model_name,
        "calibration_images": counts["calibration_images"],
        "val_images": len(start.labels),
        "near_chance": start.useless,  # None, or why the comparison says little
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "train_time_s": round(counts["train_time_s"], 1),
    }


@dataclass
class _Start:
    """Where fine-tuning starts: the fake-quantized network, and the accuracies it is compared with."""

    quantized: nn.Module  # the fused network with NNCF's quantizers, calibrated
    accuracy: dict[str, float]  # top-1 (percent) of fp32, ptq_int8 and qat_start
    labels: Tensor  # of the validation images, in order
    useless: str | None  # why fp32's top-1, near chance, makes the comparison say little; None when it does not


def _start(trained: nn.Module, data: ClassificationData, calibration: Tensor, *, num_classes: int) -> _Start:
    """The fused fp32 network's top-1, PTQ int8's, and the fake-quantized network fine-tuning starts from."""
    plain = switch_to_deploy(trained)  # everything folded: the fp32 reference, and what PTQ quantizes
    fp32_logits, labels = _logits(_torch_predictor(plain), data)
    ptq = _ov_predictor(nncf_int8(plain, calibration))  # what deploy.py quantize=int8 would ship
    accuracy = {"fp32": top1(fp32_logits, labels), "ptq_int8": top1(_logits(ptq, data)[0], labels)}
    quantized = fake_quantize(switch_to_deploy(trained, keep_post_bn=True), calibration)
    accuracy["qat_start"] = top1(_logits(_torch_predictor(quantized), data)[0], labels)
    useless = near_chance(accuracy["fp32"], num_classes)
    if useless:
        log.warning("qat: %s", useless)
    return _Start(quantized, accuracy, labels, useless)


def _check_folder(cfg: DictConfig, output_dir: Path) -> None:
    """One process, and a run folder that holds neither a run nor an IR."""
    if cfg.trainer.get("devices", 1) not in (1, "1"):
        raise ValueError(f"+experiment=qat fine-tunes in one process: set trainer.devices=1, not {cfg.trainer.devices}")
    check_run_folder(output_dir, ckpt_path=None)
    if (output_dir / INT8_DIR).exists():
        raise ValueError(
            f"run folder {output_dir} already holds {INT8_DIR}/: choose another folder (hydra.run.dir=...)"
        )


def _write(cfg: DictConfig, metrics: dict[str, Any], output_dir: Path) -> None:
    """``config.yaml`` and ``metrics.json``, each atomically, once the IR is in place."""
    with atomic_path(output_dir / "config.yaml") as tmp:
        OmegaConf.save(cfg, tmp, resolve=True)
    with atomic_path(output_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")


def summary(metrics: dict[str, Any]) -> str:
    """What train.py prints at the end of a QAT run."""
    accuracy = metrics["top1"]
    warning = [f"WARNING: {metrics['near_chance']}"] if metrics.get("near_chance") else []
    if metrics.get("fast_dev_run"):
        shown = ", ".join(f"{name} {value:.2f}%" for name, value in accuracy.items())
        first = f"fast_dev_run: top-1 on {metrics['val_images']} validation images {shown}; nothing exported or written"
        return "\n".join([first, *warning])
    check = metrics["ir_check"]
    return "\n".join(
        [
            f"top-1 on {metrics['val_images']} validation images: fp32 {accuracy['fp32']:.2f}%, "
            f"PTQ int8 {accuracy['ptq_int8']:.2f}%, QAT int8 {accuracy['qat_int8']:.2f}% "
            f"(fake-quantized torch: {accuracy['qat_start']:.2f}% before, {accuracy['qat_fake_quant']:.2f}% after "
            f"{metrics['epochs']} epochs)",
            f"int8 IR vs fake-quantized torch: top-1 agreement {100 * check['top1_agreement']:.2f}%, "
            f"max |logit diff| {check['max_abs_err']:.2e}",
            f"int8 IR: {metrics['int8_ir']}",
            *warning,
        ]
    )


def _read_init(init: str, *, model_name: str) -> RunCheckpoint:
    """The run ``qat.init`` names, checked to be a train.py run of ``model_name`` that records its data."""
    try:
        run = read_run_checkpoint(init)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"qat.init: {err}") from None
    if run is None:
        raise ValueError(f"qat.init: {init} is not a train.py checkpoint (it has no model_name hyper-parameter)")
    if run.model_name != model_name:
        raise ValueError(
            f"qat.init: {run.path} is a run of {run.model_name}, but model={model_name}: pass model={run.model_name}"
        )
    if not run.data:
        raise ValueError(f"qat.init: {run.path} does not record its data set, which QAT trains and calibrates on")
    return run


def _require_openvino() -> None:
    """One line, before any work, when the ``[openvino]`` extra is missing."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as err:
        raise UserError(f"+experiment=qat needs OpenVINO and NNCF: {_INSTALL} ({err})") from None


def _calibration_images(data: ClassificationData, count: int, *, seed: int) -> Tensor:
    """``count`` training images drawn at random, prepared as validation images are (no augmentation).

    Un-augmented, so the ranges calibration measures are those the deployed network meets.
    """
    if not len(data.calibration_set):
        raise ValueError("qat: the run's training set is empty: nothing to calibrate on")
    return sample_images(data.calibration_set, count, seed=seed)


def _logits(predict: Logits, data: ClassificationData) -> tuple[Tensor, Tensor]:
    """Logits and labels of every validation image, a batch at a time (the images are never all in memory)."""
    if not len(data.val_set):
        raise ValueError("qat: the run's validation set is empty: nothing to compare top-1 on")
    return predict_batches(predict, data.val_dataloader())


def _fine_tune(quantized: nn.Module, *, run: RunCheckpoint, data: ClassificationData, cfg: DictConfig) -> L.Trainer:
    """Train the fake-quantized network on the run's training data with the config's loss, optimizer and schedule."""
    record = run_record(
        quantized,
        model_name=run.model_name,
        model_kwargs=run.model_kwargs,
        in_chans=run.in_chans,
        image_size=data.image_size,
        data=run.data,
        preprocessing=run.preprocessing,
        class_names=run.class_names,
    )
    module = RepClassifier(
        quantized,
        record=record,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    callbacks, progress = progress_callbacks(
        [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    )
    # No checkpoints: the result is the IR, and a checkpoint of NNCF's hooks would need NNCF to read back.
    loggers = build_loggers(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, enable_checkpointing=False, **progress)
    quantized.train()  # NNCF hands it over in eval mode, which Lightning keeps: the kept BatchNorms would not train
    try:
        trainer.fit(module, datamodule=ClassificationDataModule(data))
    except (KeyboardInterrupt, SystemExit):  # SystemExit: Lightning's SIGTERMException
        raise Interrupted(f"interrupted at step {trainer.global_step} of QAT: nothing was written") from None
    if trainer.interrupted:
        raise Interrupted(f"interrupted at step {trainer.global_step} of QAT: nothing was written")
    return trainer


def _torch_predictor(model: nn.Module) -> Logits:
    model = model.cpu().float().eval()

    def predict(images: Tensor) -> Tensor:
        with torch.no_grad():
            return model(images)

    return predict


def _ov_predictor(ov_model) -> Logits:
    return infer(compile_model(ov_model))


def _export(
    quantized: nn.Module,
    calibration: Tensor,
    data: ClassificationData,
    reference: Tensor,
    settings: QATSettings,
    folder: Path,
) -> tuple[Tensor, dict[str, float]]:
    """The int8 IR in ``folder``, checked against the fake-quantized logits first: its logits, and the check."""
    with staged_folder(folder) as staging:
        ir_logits = _logits(_ov_predictor(_export_ir(quantized, calibration, folder=staging)), data)[0]
        ir_check = _check_ir(reference, ir_logits, min_agreement=settings.min_agreement)
    return ir_logits, ir_check


def _export_ir(quantized: nn.Module, example: Tensor, *, folder: Path):
    """Save ``quantized`` as ``folder/model.xml`` (+ ``.bin``) and read it back: the IR checked is the IR written."""
    import openvino as ov

    ov.save_model(to_openvino(quantized, example), folder / "model.xml", compress_to_fp16=False)
    return core().read_model(folder / "model.xml")


def _check_ir(reference: Tensor, ir: Tensor, *, min_agreement: float) -> dict[str, float]:
    abs_err, rel_err = max_errors(reference, ir)
    agreed = agreement(ir, reference)
    if agreed < min_agreement:
        raise UserError(
            f"the int8 IR predicts the fake-quantized torch model's class on {100 * agreed:.2f}% of "
            f"{len(reference)} validation images, below qat.min_agreement={min_agreement:g} "
            f"(max |logit diff| {abs_err:.2e}); nothing was written"
        )
    return {"top1_agreement": agreed, "max_abs_err": abs_err, "max_rel_err": rel_err}
