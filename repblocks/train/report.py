"""What a finished training run reports: the figures of ``metrics.json``, and the summary train.py prints."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

from repblocks.train.callbacks import DeployCheck

__all__ = ["run_metrics", "summary", "val_acc_measured_on"]


def run_metrics(trainer: L.Trainer, callbacks: list, *, train_time_s: float) -> dict[str, Any]:
    """What ``metrics.json`` holds: best and last ``val_acc``, epochs, time, checkpoints, the deploy check's figures."""
    checkpoint = trainer.checkpoint_callback
    best_score = getattr(checkpoint, "best_model_score", None)
    metrics: dict[str, Any] = {
        "val_acc": float(best_score) if best_score is not None else _logged(trainer, "val_acc"),
        "val_acc_last": _logged(trainer, "val_acc"),
        "epochs": trainer.current_epoch,
        "best_epoch": getattr(checkpoint, "best_epoch", None),  # from 1, as in the log and the checkpoint's name
        "global_step": trainer.global_step,
        "train_time_s": round(train_time_s, 1),
        "best_ckpt": getattr(checkpoint, "best_model_path", None) or None,
        "last_ckpt": getattr(checkpoint, "last_model_path", None) or None,
        "val_acc_measured_on": val_acc_measured_on(trainer, best=best_score is not None),
    }
    deploy_check = next((c for c in callbacks if isinstance(c, DeployCheck)), None)
    return {**metrics, **(_deploy_metrics(deploy_check) if deploy_check is not None else {})}


def _deploy_metrics(deploy_check: DeployCheck) -> dict[str, Any]:
    """The deploy check's figures, or why it was skipped."""
    metrics: dict[str, Any] = {"deploy_check_skipped": deploy_check.skipped} if deploy_check.skipped else {}
    deploy = deploy_check.result
    if deploy is not None:
        metrics.update(
            val_acc_deploy=deploy.val_acc_deploy,
            val_acc_train_form=deploy.val_acc_train_form,
            top1_agreement=deploy.top1_agreement,
            max_abs_err=deploy.max_abs_err,
            deploy_check_images=deploy.num_images,
            deploy_weights=deploy.deploy_weights,
        )
    return metrics


def val_acc_measured_on(trainer: L.Trainer, *, best: bool) -> str:
    """What ``val_acc`` was measured on, so that it is not read against the deploy check's figures as a contradiction.

    Lightning's figure is the one training validated and chose the best checkpoint by, at the trainer's
    precision; under DDP over every process, each validating its share of the images once
    (:class:`repblocks.train.data.ClassificationDataModule`). The deploy check reruns the best
    checkpoint in float32 in one process.
    """
    parts = [f"Lightning's val_acc of the {'best' if best else 'last'} epoch"]
    val_set = getattr(getattr(trainer.datamodule, "data", None), "val_set", None)
    images = len(val_set) if val_set is not None else None
    processes = trainer.world_size
    if processes > 1 and images is not None:
        once = isinstance(getattr(trainer.val_dataloaders, "sampler", None), UnrepeatedDistributedSampler)
        how = "each image once" if once else "some images counted twice by DDP's sampler to give each as many"
        parts.append(f"over {processes} processes sharing the {images} validation images, {how}")
    elif images is not None:
        parts.append(f"over the {images} validation images")
    if trainer.limit_val_batches != 1.0:
        parts.append(f"limited to trainer.limit_val_batches={trainer.limit_val_batches} per process")
    if not str(trainer.precision).startswith(("32", "64")):
        parts.append(f"at precision {trainer.precision}")
    return ", ".join(parts)


def _logged(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return float(value) if value is not None else None


def summary(metrics: dict[str, Any]) -> str:
    """What train.py prints at the end of a run: the accuracies, each with what it was measured on, and the files."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    skipped = metrics.get("deploy_check_skipped")
    measured_on = metrics.get("val_acc_measured_on")
    at_epoch = f" at epoch {metrics['best_epoch']}" if metrics.get("best_epoch") else ""
    lines = [f"best val acc {pct(metrics['val_acc'])}{at_epoch}" + (f" ({measured_on})" if measured_on else "")]
    if "val_acc_deploy" in metrics:  # train and deploy form on the same images: these two are the ones to compare
        lines.append(
            f"deploy check on {metrics.get('deploy_check_images', '?')} validation images, float32, one process: "
            f"train form {pct(metrics.get('val_acc_train_form'))}, deploy form {pct(metrics['val_acc_deploy'])} "
            f"(top-1 agreement {pct(metrics.get('top1_agreement'))}, max |logit diff| {metrics['max_abs_err']:.2e})"
        )
    lines += [
        f"{metrics['epochs']} epochs, {metrics['global_step']} steps in {metrics['train_time_s']:.0f} s",
        f"best checkpoint: {metrics['best_ckpt']}",
        f"deploy weights:  {metrics.get('deploy_weights') or f'none (deploy check skipped: {skipped})'}",
    ]
    return "\n".join(lines)
