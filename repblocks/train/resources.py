"""What a training run takes of the machine: threads, data-loading workers, processes, SyncBatchNorm.

On a machine other processes use, training runs on as many threads as the cores they leave free
(``threads=N`` to choose), with as many data-loading workers as fit beside them (see
:mod:`repblocks.threads`).
"""

from __future__ import annotations

import os

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from repblocks.datasets import ClassificationData
from repblocks.threads import ThreadChoice, choose_threads, loader_workers

__all__ = ["data_for_threads", "first_process", "sync_batchnorm", "use_free_cores"]


def use_free_cores(cfg: DictConfig) -> ThreadChoice:
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


def data_for_threads(config: DictConfig, choice: ThreadChoice) -> ClassificationData:
    """The data set; ``num_workers: null`` becomes as many loading workers as fit beside the threads."""
    if "num_workers" in config and config.num_workers is None:
        return instantiate(config, num_workers=loader_workers(None, choice))
    return instantiate(config)


def first_process() -> bool:
    """Whether this is the process that starts a run (rank zero).

    DDP's other processes (started by Lightning or torchrun, which set their rank in the environment)
    join the run of the first one: its folder already holds the run's files when they start.
    """
    return L.fabric.utilities.rank_zero.rank_zero_only.rank == 0


def sync_batchnorm(trainer: DictConfig) -> dict[str, bool]:
    """``trainer.sync_batchnorm=auto``: on for GPUs only, as SyncBatchNorm needs NCCL-style collectives that gloo (CPU) lacks."""
    if trainer.get("sync_batchnorm") != "auto":
        return {}
    on_gpu = trainer.accelerator in ("gpu", "cuda") or (trainer.accelerator == "auto" and torch.cuda.is_available())
    return {"sync_batchnorm": on_gpu}
