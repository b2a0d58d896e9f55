"""The LightningModule that trains any classifier of the zoo with RepVGG's recipe.

Everything configurable comes in as an object or a factory (``functools.partial``), so the
module is usable from plain Python as well as from Hydra's ``instantiate`` (``configs/module/``):

>>> model = repblocks.create_model("repvgg_a0", num_classes=10)
>>> record = run_record(model, model_name="repvgg_a0", model_kwargs={}, in_chans=3, image_size=32)
>>> module = RepClassifier(model, record=record, optimizer=partial(torch.optim.SGD, lr=0.1))

Every checkpoint saves ``record`` (:func:`repblocks.run_checkpoint.run_record`: what deploy.py
rebuilds the network from) and this module's own settings as hyper-parameters, all plain
containers, so checkpoints load with ``torch.load(path, weights_only=True)``; the network's
weights are the keys under ``weights_prefix``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from repblocks.train.losses import RDropLoss, rep_l2, rep_l2_parameters
from repblocks.train.optim import param_groups

__all__ = ["RepClassifier"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class RepClassifier(L.LightningModule):
    """Image classification with a re-parameterizable network.

    Args:
        model: The network (train form), e.g. ``create_model("repvgg_a0", num_classes=10)``.
        record: What the checkpoint says about the network (:func:`repblocks.run_checkpoint.run_record`:
            its name, classes, arguments, image size, data, preprocessing, class names), saved as it is.
        loss: ``nn.CrossEntropyLoss`` (any ``(logits, target)`` loss) or :class:`RDropLoss`, which
            gets two forward passes of every batch.
        optimizer: Factory taking the parameter groups (default: SGD, lr 0.05, momentum 0.9). Its ``weight_decay`` keyword is applied
            per group: never to normalization layers and biases, as in RepVGG's recipe.
        scheduler: Factory called as ``scheduler(optimizer, total_steps=..., steps_per_epoch=...)``,
            stepped every optimizer step; None (or an empty config: ``scheduler=constant``) keeps the
            learning rate constant.
        mixup: Factory called with ``num_classes=`` that gives timm's ``Mixup`` (or any
            ``(images, target) -> (images, soft_target)``), train only.
        ema_decay: Keep an exponential moving average of the weights (timm's ``ModelEmaV3`` with
            warm-up) and validate, checkpoint and deploy it instead of the raw weights.
        rep_l2: Replace plain weight decay on the branch kernels of every ``RepBlock`` by the
            paper's custom L2 on each block's equivalent kernel (identity branch included).
        channels_last: Feed images in channels-last memory format (faster convs on CPU and GPU).
        compile: ``torch.compile`` the network in place (state dict keys stay unchanged).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        record: Mapping[str, Any],
        loss: nn.Module | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        mixup: Callable[..., Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] | None = None,
        ema_decay: float | None = None,
        rep_l2: bool = False,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.model = model
        self.criterion = loss if loss is not None else nn.CrossEntropyLoss()
        self.optimizer_factory = optimizer or functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
        self.scheduler_factory = scheduler or None  # an empty config node (scheduler=constant) is no schedule
        self.mixup = mixup(num_classes=record["num_classes"]) if mixup is not None else None
        self.use_rep_l2 = rep_l2
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.ema = _ema(model, ema_decay) if ema_decay else None
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.compile()

        self.save_hyperparameters(
            {
                **record,
                "weights_prefix": "ema.module." if self.ema is not None else "model.",
                "ema_decay": ema_decay,
                "rep_l2": rep_l2,
                "loss": type(self.criterion).__name__,
            }
        )
        self.val_metrics = _val_metrics(record["num_classes"])

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated, checkpointed as best and deployed (EMA when on)."""
        return self.ema.module if self.ema is not None else self.model

    def forward(self, images: Tensor) -> Tensor:
        return self.eval_model(images.contiguous(memory_format=self.memory_format))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, target = batch
        if self.mixup is not None:
            images, target = self.mixup(images, target)
        images = images.contiguous(memory_format=self.memory_format)
        if isinstance(self.criterion, RDropLoss):
            # One pass over the doubled batch: each copy gets its own dropout mask, as in R-Drop's code.
            logits_a, logits_b = self.model(torch.cat([images, images])).chunk(2)
            loss = self.criterion(logits_a, logits_b, target)
            self.log("train_kl", self.criterion.last_parts.kl, on_step=False, on_epoch=True)
        else:
            loss = self.criterion(self.model(images), target)
        if self.use_rep_l2:
            penalty = 0.5 * self._weight_decay() * rep_l2(self.model)
            self.log("train_rep_l2", penalty.detach(), on_step=False, on_epoch=True)
            loss = loss + penalty
        # Checked every step: a NaN found at the end of an epoch has already wrecked every weight.
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                "lower optimizer.lr or set trainer.gradient_clip_val"
            )
        self.log("train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, target = batch
        logits = self(images)
        self.log("val_loss", nn.functional.cross_entropy(logits, target), prog_bar=True, batch_size=len(images))
        for name, metric in self.val_metrics.items():
            metric(logits, target)
            self.log(f"val_{name}", metric, prog_bar=name == "acc", batch_size=len(images))

    def configure_optimizers(self) -> Any:
        skip = rep_l2_parameters(self.model) if self.use_rep_l2 else frozenset()
        optimizer = self.optimizer_factory(param_groups(self.model, self._weight_decay(), skip=skip))
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, self.trainer.max_epochs or 1)
        scheduler = self.scheduler_factory(
            optimizer, total_steps=total_steps, steps_per_epoch=max(1, total_steps // epochs)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _weight_decay(self) -> float:
        keywords = getattr(self.optimizer_factory, "keywords", None) or {}
        return float(keywords.get("weight_decay", 0.0))


def _ema(model: nn.Module, decay: float) -> nn.Module:
    """timm's ``ModelEmaV3`` of ``model``, with warm-up."""
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=decay, use_warmup=True)
    # Averaged, never trained by gradients: unfrozen, DDP would stop on parameters without a gradient.
    return ema.requires_grad_(False)


def _val_metrics(num_classes: int) -> nn.ModuleDict:
    """Top-1 accuracy, and top-5 when there are more than 5 classes."""
    metrics = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return nn.ModuleDict(metrics)
