"""Lightning callbacks: the end-of-training deploy check.

:class:`DeployCheck` closes every training run with the question a user asks next: does the
plain network give the same answers? It reloads the best checkpoint the way deploy.py does
(``weights_only=True``, from the saved hyperparameters), converts it with ``switch_to_deploy``,
runs the whole validation set through both forms, and saves the deploy weights.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L

from repblocks.checkpoint import read_run_checkpoint
from repblocks.convert import switch_to_deploy
from repblocks.numerics import compare_forms
from repblocks.weights import build_run_model, save_weights

__all__ = ["DeployCheck", "DeployResult"]

log = logging.getLogger(__name__)


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
    """At the end of fit: convert the best checkpoint, check it on all validation images, save it.

    Args:
        output_dir: Where ``<model_name>_deploy.safetensors`` is written.

    After ``trainer.fit`` the result is in :attr:`result` (on the rank-zero process).
    """

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.result: DeployResult | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.interrupted or trainer.fast_dev_run:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        # The best checkpoint is read back as deploy.py reads it (weights_only, rebuilt from its
        # hyperparameters); without checkpointing, the weights in memory are checked.
        model = build_run_model(read_run_checkpoint(best)) if best else copy.deepcopy(pl_module.eval_model)
        hparams = pl_module.hparams
        model = model.float().eval()
        deploy = switch_to_deploy(model)
        datamodule = trainer.datamodule
        datamodule.setup("validate")
        device = pl_module.device
        compared = compare_forms(model.to(device), deploy.to(device), datamodule.val_dataloader(), device)
        path = save_weights(
            deploy,
            self.output_dir / f"{hparams['model_name']}_deploy.safetensors",
            # The same metadata as deploy.py's export, so either file says how to rebuild its model.
            metadata={
                "model": hparams["model_name"],
                "num_classes": str(hparams["num_classes"]),
                "in_chans": str(hparams["in_chans"]),
                "model_kwargs": json.dumps(hparams["model_kwargs"]),
                "form": "deploy",
            },
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
        log.info("deploy check: %s", asdict(self.result))
