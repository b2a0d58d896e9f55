"""Logits a batch at a time and top-1 in percent: how int8 is measured, by deployment and QAT alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["BATCH", "Logits", "agreement", "chance_top1", "near_chance", "predict", "predict_batches", "top1"]

BATCH = 32  # images per inference call when a tensor of images is evaluated
NEAR_CHANCE_POINTS = 10.0  # with few classes, twice chance is too far up (2 classes: 100%): within 10 points of it
Logits = Callable[[Tensor], Tensor]  # images (B, C, H, W) -> logits (B, classes)


def predict(run: Logits, images: Tensor) -> Tensor:
    """``run``'s float32 logits ``(N, classes)`` on ``images`` ``(N, C, H, W)``, :data:`BATCH` images per call."""
    return torch.cat([run(batch.contiguous()).float() for batch in images.split(BATCH)])


def predict_batches(run: Logits, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
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


def chance_top1(num_classes: int) -> float:
    """Top-1 in percent of a model that guesses uniformly among ``num_classes`` outputs."""
    return 100.0 / num_classes


def near_chance(top1_percent: float, num_classes: int) -> str | None:
    """Why a model at ``top1_percent`` is no better than guessing, or None when it is clearly better.

    Near chance means below twice chance and within :data:`NEAR_CHANCE_POINTS` of it:
    under ``min(2 * chance, chance + 10)`` percent. 10 classes: under 20%; 2 classes: under 60%;
    1000 classes: under 0.2%. An int8 model of such a model "keeps its accuracy" whatever it
    computes, so a gate or a comparison measured on it says nothing.
    """
    chance = chance_top1(num_classes)
    threshold = min(2 * chance, chance + NEAR_CHANCE_POINTS)
    if top1_percent >= threshold:
        return None
    return (
        f"fp32 top-1 {top1_percent:.2f}% is near chance ({chance:.2f}% for {num_classes} classes; "
        f"near: under {threshold:.2f}%): a model that has not learned the task keeps its accuracy in int8 "
        "whatever int8 does to it, so this comparison says little"
    )
