"""One training run, as train.py's config describes it: every object it trains with is a Hydra target.

``model=`` builds the network, ``data=`` the data set, ``datamodule`` Lightning's view of it,
``module=`` the LightningModule (with ``loss=``, ``optimizer=``, ``scheduler=`` as factories),
``trainer=``, ``callbacks=`` and ``logger=`` the rest: an experiment changes YAML, not Python.
What the run's checkpoints record for deployment is :func:`repblocks.run_checkpoint.run_record`.

Settings, folders and the resumed checkpoint are checked before any data is read; a run that fails
before its first checkpoint leaves its folder as it found it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from repblocks.datasets import ClassificationData
from repblocks.errors import Interrupted
from repblocks.files import atomic_path
from repblocks.run_checkpoint import model_arguments, run_record
from repblocks.threads import ThreadChoice
from repblocks.train.checkpoint_io import AtomicCheckpointIO
from repblocks.train.loggers import build_loggers, fresh_log_dirs, keep_earlier_csv_logs
from repblocks.train.progress import progress_callbacks
from repblocks.train.report import run_metrics
from repblocks.train.resources import data_for_threads, first_process, sync_batchnorm
from repblocks.train.resume import RUN_LENGTH_KEYS, check_resume_fits, read_resume_checkpoint
from repblocks.train.run_folder import check_run_folder, check_run_space, release_folder_if_nothing_saved

__all__ = ["build_module", "fit"]

log = logging.getLogger("train")


def fit(cfg: DictConfig, choice: ThreadChoice) -> dict[str, Any]:
    """Fit the configured model, check its deploy form, and write ``metrics.json``.

    Args:
        cfg: train.py's composed config.
        choice: The threads this process trains on (:func:`repblocks.train.resources.use_free_cores`).

    Returns:
        The metrics written to ``metrics.json`` (:func:`repblocks.train.report.run_metrics`).
    """
    output_dir = Path(cfg.paths.output_dir)
    _check_settings(cfg)
    check_run_folder(output_dir, ckpt_path=cfg.ckpt_path, subfolders=_callback_folders(cfg), new_run=first_process())
    resume = read_resume_checkpoint(cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    data = data_for_threads(cfg.data, choice)
    if first_process():
        log.info("%s; %d data-loading workers; OMP_WAIT_POLICY %s", choice.note, data.num_workers, choice.wait_policy)
    module = build_module(cfg, data)
    if resume is not None:
        check_resume_fits(cfg.ckpt_path, *resume, module)
    if not cfg.trainer.get("fast_dev_run"):  # a full disk: one line now, not after the first epoch
        check_run_space(output_dir, module)
    callbacks, trainer, fresh_logs = _trainer(cfg, resumed_step=resume[0].get("global_step", 0) if resume else None)
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(output_dir / "config.yaml") as tmp:
            OmegaConf.save(cfg, tmp, resolve=True)
    started = time.perf_counter()
    _fit(
        trainer, module, instantiate(cfg.datamodule)(data), cfg.ckpt_path, output_dir=output_dir, fresh_logs=fresh_logs
    )
    metrics = run_metrics(trainer, callbacks, train_time_s=time.perf_counter() - started)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        with atomic_path(output_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def build_module(cfg: DictConfig, data: ClassificationData) -> L.LightningModule:
    """The ``module`` config's LightningModule around ``model=``'s network, sized by the data, with its record."""
    network = instantiate(cfg.model)(num_classes=data.num_classes, in_chans=data.in_chans)
    # Settings the data leaves open (ImageFolder's mean, std, crop) are the model's: its weights expect them.
    data.use_model_preprocessing(getattr(network, "pretrained_cfg", None) or {})
    data_config = OmegaConf.to_container(cfg.data, resolve=True)
    record = run_record(
        network,
        model_name=cfg.model.name,
        model_kwargs=model_arguments(OmegaConf.to_container(cfg.model, resolve=True), network),
        in_chans=data.in_chans,
        image_size=data.image_size,
        # The data config as it ran: its open preprocessing settings (None) filled with what the data used.
        data={
            key: data.preprocessing.get(key, value) if value is None else value for key, value in data_config.items()
        },
        preprocessing=data.preprocessing,
        class_names=data.class_names,
    )
    # The run's length too: a bare resume (ckpt_path= alone) trains to the end this run was set for.
    record["run_length"] = {key: cfg.trainer.get(key) for key in RUN_LENGTH_KEYS}
    return instantiate(cfg.module)(network, record=record)


def _check_settings(cfg: DictConfig) -> None:
    """Refuse settings that train nothing (the run would check and export untrained weights), or R-Drop without dropout."""
    if str(cfg.loss.get("_target_", "")).endswith(".RDropLoss") and not cfg.model.get("drop_rate"):
        raise ValueError("loss=rdrop needs dropout to regularize: set model.drop_rate above 0 (e.g. 0.2)")
    if cfg.trainer.get("fast_dev_run"):
        return
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        if cfg.trainer.get(key) == 0:
            raise ValueError(f"trainer.{key}=0 trains nothing: set it above 0 (or leave it at its default)")


def _callback_folders(cfg: DictConfig) -> list[Path]:
    """The folders the callbacks write into (checkpoints, deploy weights), to check before any work."""
    nodes = (cfg.get("callbacks") or {}).values()
    return [Path(node[key]) for node in nodes if node for key in ("dirpath", "output_dir") if node.get(key)]


def _trainer(cfg: DictConfig, *, resumed_step: int | None) -> tuple[list, L.Trainer, list[Path]]:
    """The callbacks, the trainer, and the log folders this run will create."""
    callbacks, progress = progress_callbacks(
        [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    )
    loggers = build_loggers(cfg.get("logger"))
    if resumed_step is not None and first_process():
        keep_earlier_csv_logs(loggers, step=resumed_step)
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        plugins=[AtomicCheckpointIO()],  # a kill while saving never leaves half a last.ckpt
        **sync_batchnorm(cfg.trainer),
        **progress,  # a line per epoch instead of a bar, when the output is not a terminal
    )
    return callbacks, trainer, fresh_log_dirs(loggers)


def _fit(trainer: L.Trainer, module: L.LightningModule, datamodule, ckpt_path: str | None, *, output_dir, fresh_logs):
    """``trainer.fit``; an interruption says how to resume, a failure before any checkpoint frees the folder."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except (KeyboardInterrupt, SystemExit):
        # Lightning ends Ctrl-C and SIGTERM this way, after ModelCheckpoint(save_on_exception) saved.
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "no checkpoint was saved"
        raise Interrupted(f"interrupted at step {trainer.global_step}: resume with ckpt_path={last}") from None
    except Exception:
        if trainer.is_global_zero and ckpt_path is None:
            release_folder_if_nothing_saved(output_dir, fresh_logs=fresh_logs)
        raise
