"""Lightning callbacks: checkpoints confined to their run's folder, and the end-of-training deploy check.

:class:`RunModelCheckpoint` is Lightning's ``ModelCheckpoint`` that writes ``last.ckpt`` after every
epoch, numbers epochs from 1 as the log and the plot do, and treats the paths a resumed checkpoint
names as data: it only ever removes a regular file inside its own checkpoints folder.
:class:`DeployCheck` closes every training run with the question a user asks next: does the
plain network give the same answers? It reloads the best checkpoint the way deploy.py does
(``weights_only=True``, from the saved hyperparameters), converts it with ``switch_to_deploy``,
runs the validation set through both forms in full float32, fails the run when they differ
beyond a tolerance, and saves the deploy weights.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DataLoader

from repblocks.convert import switch_to_deploy
from repblocks.errors import UserError
from repblocks.numerics import compare_forms, ieee_fp32, within_tolerance
from repblocks.run_checkpoint import build_run_model, read_run_checkpoint, run_deploy_metadata
from repblocks.weights import save_weights

__all__ = ["DeployCheck", "DeployResult", "NoCheckpointOnError", "RunModelCheckpoint", "inside_folder"]

log = logging.getLogger(__name__)


def inside_folder(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file inside ``folder``, both as written (``..`` resolved) and after symlinks.

    For a remote folder (``s3://...``), whose files cannot be checked without a request: whether ``path``
    is written below it, with no ``..`` on the way.
    """
    if "://" in str(folder) or "://" in str(path):
        below = str(path).startswith(str(folder).rstrip("/") + "/")
        return below and ".." not in PurePosixPath(str(path).partition("://")[2]).parts
    written = Path(os.path.abspath(path))  # abspath normalizes "..", which Path.absolute() keeps
    folder = Path(os.path.abspath(folder))
    if folder not in written.parents or not written.is_file():  # is_file: a regular file (after symlinks)
        return False
    return folder.resolve() in written.resolve().parents


class RunModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, with ``last.ckpt`` written every epoch and epochs counted from 1.

    ``last.ckpt`` after every epoch: Lightning 2.6 rewrites it only when it saves a new best, so a
    run whose monitored metric stopped improving at epoch 15 of 30 kept epoch 15 there, and a
    resume (after a kill, or of the finished run) started over from epoch 16. Here it holds the
    end of the last epoch trained, whatever the metric did, and a run killed in epoch N resumes at
    epoch N.

    Epochs from 1: ``{epoch}`` in ``filename`` is the epoch as the log (``epoch 3/30``),
    ``metrics.json`` (``best_epoch``) and ``training_curves.png`` count it, so the best checkpoint
    of the third epoch is ``epoch=003-...``. :attr:`best_epoch` is that epoch of the best checkpoint.

    Removes only regular files inside its own ``dirpath``: a checkpoint resumed from carries this
    callback's state, the paths of the last and best checkpoints, which Lightning later removes as
    they are replaced. Lightning checks that they lie in ``dirpath`` without resolving ``..`` and
    removes recursively, so a crafted checkpoint could name any folder. Here the paths restored from
    a checkpoint are kept only when they name a file inside ``dirpath`` (the rest are logged and
    forgotten), and a removal is refused otherwise.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.best_epoch: int | None = None  # the epoch (from 1) of best_model_path
        self._last_saved_at_step: int | None = None

    @property
    def state_key(self) -> str:
        # Lightning's own name for the state: checkpoints written with ModelCheckpoint resume here, and back.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # After Lightning's own saving, on both of its paths (here, or at the validation just before): the end
        # of every epoch is the moment a resume starts the next one from.
        if self.save_last and self._saving_allowed(trainer) and self._last_saved_at_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _saving_allowed(self, trainer: L.Trainer) -> bool:
        """Lightning's conditions for saving at all (its own check also skips a step it saved at)."""
        return (
            not trainer.fast_dev_run
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and trainer.global_step > 0
        )

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_at_step = trainer.global_step

    def _monitor_candidates(self, trainer: L.Trainer) -> dict:
        candidates = super()._monitor_candidates(trainer)
        # Lightning's current_epoch counts finished epochs: during (and at the end of) the third epoch it is 2.
        candidates["epoch"] = torch.tensor(trainer.current_epoch + 1)
        return candidates

    def _update_best_and_save(self, current, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._update_best_and_save(current, trainer, monitor_candidates)
        if self.best_model_path and self.best_model_path == self._last_checkpoint_saved:  # this save is the best
            self.best_epoch = int(monitor_candidates["epoch"])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.best_k_models = {path: score for path, score in self.best_k_models.items() if self._own(path)}
        for name in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if getattr(self, name) and not self._own(getattr(self, name)):
                setattr(self, name, "")
        if self.kth_best_model_path == "" and self.best_k_models:  # the worst of those kept, as Lightning tracks it
            worst = min if self.mode == "max" else max
            self.kth_best_model_path = worst(self.best_k_models, key=lambda path: self.best_k_models[path])
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        best_epoch = state_dict.get("best_epoch")  # absent from checkpoints written before it was recorded
        self.best_epoch = best_epoch if self.best_model_path and isinstance(best_epoch, int) else None

    def _own(self, path: str) -> bool:
        if self.dirpath is not None and inside_folder(path, self.dirpath):
            return True
        log.warning(
            "the resumed checkpoint names %s, not a file in %s: it is ignored, never removed", path, self.dirpath
        )
        return False

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self.dirpath is None or not inside_folder(filepath, self.dirpath):
            log.warning("not removing %s: only files inside %s are removed", filepath, self.dirpath)
            return
        super()._remove_checkpoint(trainer, filepath)


@dataclass
class DeployResult:
    """What :class:`DeployCheck` measured on the validation set."""

    val_acc_train_form: float  # the checkpoint's train-form network, recomputed here
    val_acc_deploy: float  # the same weights after switch_to_deploy
    top1_agreement: float  # fraction of images on which both forms predict the same class
    max_abs_err: float  # largest |logit difference| over the whole validation set
    num_images: int
    checkpoint: str  # the checkpoint that was converted ("" when the in-memory model was)
    deploy_weights: str  # the .safetensors written, loadable by create_model(name, deploy=True)


class DeployCheck(L.Callback):
    """At the end of fit: convert the best checkpoint, check it on the validation images, save it.

    Both forms run in full float32 (:func:`repblocks.numerics.ieee_fp32`), also on GPUs that would
    round float32 convs to TF32: the error measured is the conversion's, not TF32's. The check
    takes the validation batches the trainer validated on (``trainer.limit_val_batches``).

    Args:
        output_dir: Where ``<model_name>_deploy.safetensors`` is written.
        atol, rtol: Largest |logit difference| between the forms, absolute or relative to the
            largest logit; over both, the run fails (:class:`repblocks.errors.UserError`) and no
            deploy weights are written. float32 rounding alone gives about 1e-6.

    After ``trainer.fit`` the result is in :attr:`result` (on the rank-zero process), or, when
    there was nothing to check, the reason in :attr:`skipped`.
    """

    def __init__(self, output_dir: str | Path, *, atol: float = 1e-4, rtol: float = 1e-4):
        if not (atol >= 0 and rtol >= 0):
            raise ValueError(f"deploy_check atol and rtol must be non-negative, got atol={atol}, rtol={rtol}")
        self.output_dir = Path(output_dir)
        self.atol, self.rtol = atol, rtol
        self.result: DeployResult | None = None
        self.skipped: str | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.interrupted or trainer.fast_dev_run:
            return
        batches = self._batches(trainer)
        if batches is None:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        # The best checkpoint is read back as deploy.py reads it (weights_only, rebuilt from its
        # hyperparameters); without checkpointing, the weights in memory are checked.
        model = build_run_model(read_run_checkpoint(best)) if best else copy.deepcopy(pl_module.eval_model)
        model = model.float().eval()
        deploy = switch_to_deploy(model)
        device = pl_module.device
        with ieee_fp32():
            compared = compare_forms(model.to(device), deploy.to(device), batches, device)
        if not compared:
            self.skipped = "the validation batches held no images"
            log.warning("deploy check skipped: %s; no deploy weights written", self.skipped)
            return
        self._save(deploy, compared, best=best, hparams=pl_module.hparams)

    def _batches(self, trainer: L.Trainer) -> list | None:
        """Every validation batch the trainer validated on, in this one process; None (and why, in :attr:`skipped`) when none."""
        datamodule = trainer.datamodule
        datamodule.setup("validate")
        # Every validation image, in this one process: the datamodule's hook gives a process its DDP share.
        loader = datamodule.data.val_dataloader() if hasattr(datamodule, "data") else datamodule.val_dataloader()
        batches = _validated_batches(loader, trainer.limit_val_batches)
        if batches is None:
            self.skipped = (
                f"no validation batches to compare on (trainer.limit_val_batches={trainer.limit_val_batches})"
            )
            log.warning(
                "deploy check skipped: %s; no deploy weights written (deploy.py converts and checks)", self.skipped
            )
        return batches

    def _save(self, deploy: nn.Module, compared: dict, *, best: str, hparams) -> None:
        """Write the deploy weights when the forms agree within tolerance (else one line, nothing written)."""
        if not within_tolerance(compared["max_abs_err"], compared["max_rel_err"], atol=self.atol, rtol=self.rtol):
            raise UserError(
                f"deploy check failed: the deploy form of {best or 'the trained model'} differs from its train form by "
                f"{compared['max_abs_err']:.2e} abs, {compared['max_rel_err']:.2e} rel over {compared['images']} "
                f"validation images (tolerance callbacks.deploy_check.atol={self.atol:g} or rtol={self.rtol:g}); "
                "no deploy weights written"
            )
        path = save_weights(
            deploy,
            self.output_dir / f"{hparams['model_name']}_deploy.safetensors",
            # The same metadata as deploy.py's export, so either file says how to rebuild its model.
            metadata=run_deploy_metadata(hparams),
        )
        self.result = DeployResult(
            val_acc_train_form=compared["train_accuracy"],
            val_acc_deploy=compared["deploy_accuracy"],
            top1_agreement=compared["top1_agreement"],
            max_abs_err=compared["max_abs_err"],
            num_images=compared["images"],
            checkpoint=str(best),
            deploy_weights=str(path),
        )
        log.info(
            "deploy check on %d validation images: top-1 agreement %.2f%%, max |logit diff| %.1e, val acc %.2f%% "
            "(train form %.2f%%); deploy weights: %s",
            self.result.num_images,
            100 * self.result.top1_agreement,
            self.result.max_abs_err,
            100 * self.result.val_acc_deploy,
            100 * self.result.val_acc_train_form,
            self.result.deploy_weights,
        )


class NoCheckpointOnError(L.Callback):
    """``ModelCheckpoint(save_on_exception=True)`` for interrupts only: an error saves no checkpoint.

    Ctrl-C and SIGTERM (Lightning's ``SIGTERMException``) stop a healthy run, whose ``last.ckpt``
    resumes it. An error (a corrupt image, a NaN loss) stops a run in the middle of an epoch:
    a checkpoint of it would be named like a result (``epoch=001-val_acc=0.0000.ckpt``), claim the
    run folder, and Lightning would print the error's whole message, a worker's traceback
    included, beside the one line train.py prints. Lightning calls checkpoint callbacks last, so
    this one runs before them.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, Exception):  # KeyboardInterrupt, SystemExit (SIGTERM): saved as configured
            return
        for callback in trainer.checkpoint_callbacks:
            if hasattr(callback, "save_on_exception"):
                callback.save_on_exception = False  # the run ends here; nothing else reads it


def _validated_batches(loader: DataLoader, limit: int | float) -> Iterable | None:
    """The batches of ``loader`` that Lightning validates under ``trainer.limit_val_batches`` (None: none)."""
    if isinstance(limit, float) and limit == 1.0:
        return loader
    count = min(limit, len(loader)) if isinstance(limit, int) else int(limit * len(loader))
    return itertools.islice(loader, count) if count > 0 else None
