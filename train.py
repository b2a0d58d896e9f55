"""Train a zoo model with Lightning, configured by Hydra.

    python train.py model=repvgg_a0                      # digits, embedded: no download
    python train.py model=repvgg_a0 loss=rdrop trainer=cpu trainer.max_epochs=50
    python train.py data=cifar10 data.root=~/data trainer.precision=bf16-mixed
    python train.py ckpt_path=outputs/train/.../checkpoints/last.ckpt   # resume

Outputs land in the run directory (``hydra.run.dir=...`` to choose it): ``config.yaml``
(resolved), ``checkpoints/`` (best and last), ``logs/``, ``deploy/<model>_deploy.safetensors``
and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from repblocks.cli import check_overrides, exit_on_user_error, quote_path_values
from repblocks.files import atomic_path
from repblocks.train.callbacks import DeployCheck
from repblocks.train.data import ClassificationDataModule
from repblocks.train.module import RepClassifier

log = logging.getLogger("train")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_MODEL_META_KEYS = ("_target_", "_partial_", "name")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured model, check its deploy form, and write ``metrics.json``.

    Returns:
        The metrics written to ``metrics.json`` (best ``val_acc``, ``val_acc_deploy``,
        ``max_abs_err``, ``best_ckpt``, ``deploy_weights``, ...).
    """
    output_dir = Path(cfg.paths.output_dir)
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {cfg.ckpt_path}")
    L.seed_everything(cfg.seed, workers=True)

    datamodule = ClassificationDataModule(instantiate(cfg.data))
    model_kwargs = {
        k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in _MODEL_META_KEYS
    }
    network = instantiate(cfg.model)(num_classes=datamodule.num_classes, in_chans=datamodule.in_chans)
    loss = instantiate(cfg.loss)
    if type(loss).__name__ == "RDropLoss" and not model_kwargs.get("drop_rate"):
        raise ValueError("loss=rdrop needs dropout to regularize: set model.drop_rate above 0 (e.g. 0.2)")
    module = RepClassifier(
        network,
        model_name=cfg.model.name,
        model_kwargs=model_kwargs,
        in_chans=datamodule.in_chans,
        image_size=datamodule.image_size,
        data=OmegaConf.to_container(cfg.data, resolve=True),
        loss=loss,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        mixup=instantiate(cfg.mixup, num_classes=datamodule.num_classes) if cfg.get("mixup") else None,
        ema_decay=cfg.ema_decay,
        rep_l2=cfg.rep_l2,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
    )
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=_loggers(cfg.get("logger")), **_sync_batchnorm(cfg))

    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(output_dir / "config.yaml") as tmp:
            OmegaConf.save(cfg, tmp, resolve=True)
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except (KeyboardInterrupt, SystemExit):
        # Lightning ends Ctrl-C and SIGTERM this way, after ModelCheckpoint(save_on_exception) saved.
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "no checkpoint was saved"
        raise SystemExit(f"interrupted at step {trainer.global_step}: resume with ckpt_path={last}") from None
    metrics = _metrics(trainer, callbacks, train_time_s=time.perf_counter() - started)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        with atomic_path(output_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _loggers(config: DictConfig | None) -> list:
    loggers = []
    for name, node in (config or {}).items():
        if name == "tensorboard" and not _tensorboard_installed():
            log.info("tensorboard is not installed: logging to CSV only")
            continue
        loggers.append(instantiate(node))
    return loggers or False


def _tensorboard_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX"))


def _sync_batchnorm(cfg: DictConfig) -> dict[str, bool]:
    # SyncBatchNorm needs NCCL-style collectives that gloo (CPU) lacks: "auto" turns it on for GPUs only.
    if cfg.trainer.get("sync_batchnorm") != "auto":
        return {}
    on_gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (
        cfg.trainer.accelerator == "auto" and torch.cuda.is_available()
    )
    return {"sync_batchnorm": on_gpu}


def _metrics(trainer: L.Trainer, callbacks: list, *, train_time_s: float) -> dict[str, Any]:
    checkpoint = trainer.checkpoint_callback
    best_score = getattr(checkpoint, "best_model_score", None)
    metrics: dict[str, Any] = {
        "val_acc": float(best_score) if best_score is not None else _logged(trainer, "val_acc"),
        "val_acc_last": _logged(trainer, "val_acc"),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "train_time_s": round(train_time_s, 1),
        "best_ckpt": getattr(checkpoint, "best_model_path", None) or None,
        "last_ckpt": getattr(checkpoint, "last_model_path", None) or None,
    }
    deploy = next((c.result for c in callbacks if isinstance(c, DeployCheck) and c.result), None)
    if deploy is not None:
        metrics.update(
            val_acc_deploy=deploy.val_acc_deploy,
            val_acc_train_form=deploy.val_acc_train_form,
            top1_agreement=deploy.top1_agreement,
            max_abs_err=deploy.max_abs_err,
            deploy_weights=deploy.deploy_weights,
        )
    return metrics


def _logged(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return float(value) if value is not None else None


def _summary(metrics: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    lines = [
        f"best val acc {pct(metrics['val_acc'])}, deploy form {pct(metrics.get('val_acc_deploy'))} "
        f"(top-1 agreement {pct(metrics.get('top1_agreement'))}, max |logit diff| {metrics.get('max_abs_err', float('nan')):.2e})",
        f"{metrics['epochs']} epochs, {metrics['global_step']} steps in {metrics['train_time_s']:.0f} s",
        f"best checkpoint: {metrics['best_ckpt']}",
        f"deploy weights:  {metrics.get('deploy_weights')}",
    ]
    return "\n".join(lines)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        metrics = train(cfg)
    if metrics.get("val_acc") is not None and L.fabric.utilities.rank_zero.rank_zero_only.rank == 0:
        print(_summary(metrics))


if __name__ == "__main__":
    sys.argv[1:] = quote_path_values(sys.argv[1:])  # checkpoint names hold '=': quote them for Hydra
    with exit_on_user_error():
        check_overrides(sys.argv[1:], CONFIG_DIR, "train")
    main()
