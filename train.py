"""Train a zoo model with Lightning, configured by Hydra.

    python train.py model=repvgg_a0                      # digits, embedded: no download
    python train.py model=repvgg_a0 loss=rdrop trainer=cpu trainer.max_epochs=50
    python train.py data=cifar10 data.root=~/data trainer.precision=bf16-mixed
    python train.py ckpt_path=outputs/train/.../checkpoints/last.ckpt   # resume
    python train.py model=qarepvgg_a0 +experiment=qat qat.init=outputs/train/.../RUN   # int8 QAT of a run

Outputs land in the run directory (``hydra.run.dir=...`` to choose it): ``config.yaml``
(resolved), ``checkpoints/`` (best and last, each written atomically), ``logs/``,
``deploy_weights/<model>_deploy.safetensors``, ``metrics.json`` and ``training_curves.png``. A folder that holds a run is not
reused by another one; resuming from a checkpoint inside it continues that run there. A resumed
run takes its checkpoint's model, loss, rep_l2, EMA and data settings (``repblocks/train/resume.py``).
Settings, folders and the resumed checkpoint are checked before any data is read.

On a machine other processes use, training runs on as many threads as the cores they leave free
(``threads=N`` to choose), with as many data-loading workers as fit beside them, and OpenMP's idle
threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, unless the environment sets it):
see :mod:`repblocks.threads`. Written to a log or a pipe, progress is a line per epoch.
"""

# ruff: noqa: E402  (the OpenMP setting below must precede the imports that load torch)
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP (repblocks/threads.py)

import functools
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
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from omegaconf import DictConfig, OmegaConf

from repblocks.checkpoint import read_checkpoint
from repblocks.cli import PATH_KEYS, check_overrides, exit_on_user_error, quote_path_values
from repblocks.config_help import config_help
from repblocks.files import atomic_path
from repblocks.run_checkpoint import RunCheckpoint, read_run_checkpoint
from repblocks.threads import ThreadChoice, choose_threads, loader_workers
from repblocks.train.callbacks import DeployCheck
from repblocks.train.checkpoint_io import AtomicCheckpointIO
from repblocks.train.console import log_from_rank_zero, quiet_lightning
from repblocks.train.data import ClassificationDataModule
from repblocks.train.module import RepClassifier
from repblocks.train.progress import progress_callbacks
from repblocks.train.qat import quantization_aware_training
from repblocks.train.qat import summary as qat_summary
from repblocks.train.resume import check_resumed_as_trained, recorded_overrides
from repblocks.train.run_folder import check_run_folder, check_run_space, run_files

log = logging.getLogger("train")
log_from_rank_zero()  # under DDP, each line once: the other processes log their errors only
quiet_lightning()  # Lightning's advice on every run (a cloud logger's tip, a deprecation inside it): no news about the run
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# --help: train.py's config groups and settings, described by the comments in their yaml files (configs/train.yaml
# names the resolver in hydra.help.template); configs/deploy/ is deploy.py's own config root, not a group of train's.
OmegaConf.register_new_resolver(
    "train_help",
    lambda: config_help(CONFIG_DIR, "train", usage="\n\n".join(__doc__.split("\n\n")[:2]), skip=["deploy"]),
    replace=True,
)
# Config keys that are no architecture argument, left out of the checkpoint's model_kwargs: where the
# weights started (pretrained=...) is no part of the network a checkpoint rebuilds, and reading it back would
# download or open another file.
_MODEL_META_KEYS = ("_target_", "_partial_", "name", "pretrained")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured model, check its deploy form, and write ``metrics.json``.

    Returns:
        The metrics written to ``metrics.json`` (best ``val_acc``, ``val_acc_deploy``,
        ``max_abs_err``, ``best_ckpt``, ``deploy_weights``, ...).
    """
    choice = _use_free_cores(cfg)
    if cfg.get("qat") is not None:  # +experiment=qat: fine-tune a finished run with fake quantization, export int8
        return quantization_aware_training(cfg, loggers=functools.partial(_loggers, cfg.get("logger")))
    output_dir = Path(cfg.paths.output_dir)
    _check_training_length(cfg.trainer)
    check_run_folder(output_dir, ckpt_path=cfg.ckpt_path, subfolders=_callback_folders(cfg), new_run=_first_process())
    resume = _read_resume_checkpoint(cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True)

    data = _data(cfg.data, choice)
    if _first_process():
        log.info("%s; %d data-loading workers; OMP_WAIT_POLICY %s", choice.note, data.num_workers, choice.wait_policy)
    datamodule = ClassificationDataModule(data)
    model_kwargs = {
        k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in _MODEL_META_KEYS
    }
    network = instantiate(cfg.model)(num_classes=datamodule.num_classes, in_chans=datamodule.in_chans)
    if hasattr(network, "bn_eps"):  # recorded, so the checkpoint rebuilds its model with the eps it trained with
        model_kwargs.setdefault("bn_eps", network.bn_eps)
    # Settings the data leaves open (ImageFolder's mean, std, crop) are the model's: its weights expect them.
    data.use_model_preprocessing(getattr(network, "pretrained_cfg", None) or {})
    loss = instantiate(cfg.loss)
    if type(loss).__name__ == "RDropLoss" and not model_kwargs.get("drop_rate"):
        raise ValueError("loss=rdrop needs dropout to regularize: set model.drop_rate above 0 (e.g. 0.2)")
    module = RepClassifier(
        network,
        model_name=cfg.model.name,
        model_kwargs=model_kwargs,
        in_chans=datamodule.in_chans,
        image_size=datamodule.image_size,
        data=_data_config(cfg.data, data.preprocessing),
        preprocessing=data.preprocessing,
        class_names=data.class_names,
        loss=loss,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        mixup=instantiate(cfg.mixup, num_classes=datamodule.num_classes) if cfg.get("mixup") else None,
        ema_decay=cfg.ema_decay,
        rep_l2=cfg.rep_l2,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
    )
    if resume is not None:
        _check_resume_fits(cfg.ckpt_path, *resume, module)
    if not cfg.trainer.get("fast_dev_run"):  # a full disk: one line now, not after the first epoch
        check_run_space(output_dir, module)
    callbacks, progress = progress_callbacks(
        [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    )
    loggers = _loggers(cfg.get("logger"))
    if resume is not None and _first_process():
        _keep_earlier_csv_logs(loggers, step=resume[0].get("global_step", 0))
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        plugins=[AtomicCheckpointIO()],  # a kill while saving never leaves half a last.ckpt
        **_sync_batchnorm(cfg),
        **progress,  # a line per epoch instead of a bar, when the output is not a terminal
    )

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
    except Exception:
        if trainer.is_global_zero and resume is None:
            _release_folder_if_nothing_saved(output_dir)
        raise
    metrics = _metrics(trainer, callbacks, train_time_s=time.perf_counter() - started)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        with atomic_path(output_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _use_free_cores(cfg: DictConfig) -> ThreadChoice:
    """Run torch on ``threads`` threads, else as many as the cores other processes leave free (each DDP process its share)."""
    processes = _processes(cfg.trainer)
    choice = choose_threads(cfg.get("threads"), setting="threads", processes=processes)
    torch.set_num_threads(choice.threads)
    if processes > 1:  # the processes Lightning starts read it, and Lightning then leaves their threads alone
        os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    return choice


def _processes(trainer: DictConfig) -> int:
    """Training processes on this machine: ``trainer.devices`` under a DDP strategy, else one."""
    devices = trainer.get("devices")
    if "ddp" in str(trainer.get("strategy") or "") and isinstance(devices, int):
        return devices
    return 1


def _data(config: DictConfig, choice: ThreadChoice):
    """The data set; ``num_workers: null`` becomes as many loading workers as fit beside the threads."""
    if "num_workers" in config and config.num_workers is None:
        return instantiate(config, num_workers=loader_workers(None, choice))
    return instantiate(config)


def _release_folder_if_nothing_saved(output_dir: Path) -> None:
    """A run that failed before its first checkpoint leaves nothing to resume: its config.yaml no longer claims the folder.

    Without this, running the corrected command again in the same folder would be refused as a second run.
    """
    if run_files(output_dir) != ["config.yaml"]:
        return
    (output_dir / "config.yaml").unlink()
    log.info("the run failed before saving a checkpoint: %s is free for another run", output_dir)


def _check_training_length(trainer: DictConfig) -> None:
    """Refuse settings that train nothing: the run would check and export untrained weights."""
    if trainer.get("fast_dev_run"):
        return
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        if trainer.get(key) == 0:
            raise ValueError(f"trainer.{key}=0 trains nothing: set it above 0 (or leave it at its default)")


def _first_process() -> bool:
    # DDP's other processes (started by Lightning or torchrun, which set their rank in the environment)
    # join the run of the first one: its folder already holds the run's files when they start.
    return L.fabric.utilities.rank_zero.rank_zero_only.rank == 0


def _callback_folders(cfg: DictConfig) -> list[Path]:
    """The folders the callbacks write into (checkpoints, deploy weights), to check before any work."""
    nodes = (cfg.get("callbacks") or {}).values()
    return [Path(node[key]) for node in nodes if node for key in ("dirpath", "output_dir") if node.get(key)]


def _read_resume_checkpoint(ckpt_path: str | None) -> tuple[dict, RunCheckpoint] | None:
    """The checkpoint to resume from, read safely now: a truncated or foreign file fails before any work."""
    if ckpt_path is None:
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {ckpt_path}")
    try:
        checkpoint = read_checkpoint(ckpt_path)
        run = read_run_checkpoint(ckpt_path, checkpoint)
    except ValueError as err:  # truncated, not a checkpoint, a pickle that needs code: one line that names the setting
        raise ValueError(f"ckpt_path: {err}") from None
    if run is None:
        raise ValueError(f"ckpt_path: {ckpt_path} is not a train.py checkpoint (it has no model_name hyper-parameter)")
    return checkpoint, run


def _check_resume_fits(ckpt_path: str, checkpoint: dict, saved: RunCheckpoint, module: RepClassifier) -> None:
    """Refuse, in one line, a checkpoint whose model is not the one this run builds."""
    ours = module.hparams
    theirs = (saved.model_name, saved.num_classes, saved.in_chans)
    if theirs != (ours["model_name"], ours["num_classes"], ours["in_chans"]):
        raise ValueError(
            f"ckpt_path: {ckpt_path} is a checkpoint of {saved.model_name} with num_classes={saved.num_classes}, "
            f"in_chans={saved.in_chans}; this run builds {ours['model_name']} with num_classes={ours['num_classes']}, "
            f"in_chans={ours['in_chans']} (from model= and the data)"
        )
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in checkpoint["state_dict"].items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    reshaped = sorted(key for key in expected.keys() & found.keys() if expected[key] != found[key])
    if missing or unexpected or reshaped:
        parts = [
            f"{len(keys)} {what} (first: {keys[0]})"
            for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"))
            if keys
        ]
        raise ValueError(
            f"ckpt_path: the weights of {ckpt_path} do not fit this run's model: {', '.join(parts)} "
            f"(saved with model_kwargs={saved.model_kwargs}, ema_decay={saved.hyper_parameters.get('ema_decay')}; "
            f"this run: model_kwargs={ours['model_kwargs']}, ema_decay={ours['ema_decay']})"
        )


def _data_config(config: DictConfig, preprocessing: dict) -> dict:
    """The data config to save, its open preprocessing settings (None) filled with what the data used."""
    resolved = OmegaConf.to_container(config, resolve=True)
    return {
        key: preprocessing.get(key) if value is None and key in preprocessing else value
        for key, value in resolved.items()
    }


def _loggers(config: DictConfig | None) -> list:
    loggers = []
    for name, node in (config or {}).items():
        if name == "tensorboard" and not _tensorboard_installed():
            raise ValueError("logger=tensorboard needs TensorBoard: pip install tensorboard (or leave logger at csv)")
        loggers.append(instantiate(node))
    return loggers or False


def _keep_earlier_csv_logs(loggers: list | bool, *, step: int) -> None:
    # A run resumed in its own folder finds its earlier metrics.csv, which Lightning's CSVLogger would delete.
    for logger in loggers or []:
        if isinstance(logger, CSVLogger):
            earlier = Path(logger.log_dir) / "metrics.csv"
            if earlier.is_file():
                earlier.rename(earlier.with_name(f"metrics.before-step-{step}.csv"))


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
        "val_acc_measured_on": _val_acc_measured_on(trainer, best=best_score is not None),
    }
    deploy_check = next((c for c in callbacks if isinstance(c, DeployCheck)), None)
    deploy = deploy_check.result if deploy_check is not None else None
    if deploy_check is not None and deploy_check.skipped:
        metrics["deploy_check_skipped"] = deploy_check.skipped
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


def _val_acc_measured_on(trainer: L.Trainer, *, best: bool) -> str:
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


def _summary(metrics: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    skipped = metrics.get("deploy_check_skipped")
    measured_on = metrics.get("val_acc_measured_on")
    lines = [f"best val acc {pct(metrics['val_acc'])}" + (f" ({measured_on})" if measured_on else "")]
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


def _resume_as_trained(overrides: list[str], ckpt_path: str) -> tuple[list[str], DictConfig]:
    """The command line with the resumed checkpoint's own settings (model, loss, rep_l2, EMA, data) put first.

    Refuses, before anything is written, a command line that sets one of them otherwise.
    """
    _, run = _read_resume_checkpoint(ckpt_path)
    recorded = recorded_overrides(run, CONFIG_DIR, overrides)
    if recorded and _first_process():
        shown = [
            arg for arg in recorded if not arg.startswith("data.")
        ]  # the data set's own settings: too many to read
        print(f"resuming {run.path} as it was trained: {' '.join(shown)}", file=sys.stderr)
    overrides = [*recorded, *overrides]
    composed = check_overrides(overrides, CONFIG_DIR, "train")
    check_resumed_as_trained(run, composed)
    return overrides, composed


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Train; return the monitored metric (best ``val_acc``), which Hydra's sweepers optimize."""
    with exit_on_user_error():
        metrics = train(cfg)
    if _first_process():
        print(qat_summary(metrics) if cfg.get("qat") is not None else _summary(metrics))
    return metrics.get("val_acc")


if __name__ == "__main__":
    # Checkpoint names hold '=': quote them for Hydra.
    sys.argv[1:] = quote_path_values(sys.argv[1:], (*PATH_KEYS, "qat.init"))
    with exit_on_user_error():
        composed = check_overrides(sys.argv[1:], CONFIG_DIR, "train")
        if composed is not None and composed.ckpt_path is not None and composed.get("qat") is None:
            sys.argv[1:], composed = _resume_as_trained(sys.argv[1:], composed.ckpt_path)
        if composed is not None:  # before Hydra writes its logs and .hydra/ into the run folder
            check_run_folder(composed.hydra.run.dir, ckpt_path=composed.ckpt_path, new_run=_first_process())
    main()
