"""Logits a batch at a time and top-1 in percent: how int8 is measured, by deployment and QAT alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["BATCH", "Predictor", "agreement", "predict", "predict_batches", "top1"]

BATCH = 32  # images per inference call when a tensor of images is evaluated
Predictor = Callable[[Tensor], Tensor]  # images (B, C, H, W) -> logits (B, classes)


def predict(run: Predictor, images: Tensor) -> Tensor:
    """``run``'s float32 logits ``(N, classes)`` on ``images`` ``(N, C, H, W)``, :data:`BATCH` images per call."""
    return torch.cat([run(batch.contiguous()).float() for batch in images.split(BATCH)])


def predict_batches(run: Predictor, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``(logits, labels)`` of every ``(images, labels)`` batch of ``batches`` (a loader): never all images at once.

    Raises:
        ValueError: ``batches`` is empty.
    """
    logits, labels = [], []
    for images, target in batches:
        logits.append(run(images.contiguous()).float())
        labels.append(target)
    if not labels:
        raise ValueError("no images to evaluate: the validation set is empty")
    return torch.cat(logits), torch.cat(labels)


def top1(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def agreement(logits: Tensor, reference: Tensor) -> float:
    """The fraction of images on which ``logits`` predict the class ``reference`` predicts."""
    return (logits.argmax(1) == reference.argmax(1)).float().mean().item()
