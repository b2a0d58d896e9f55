"""Helpers for checking conversions: BatchNorm statistics that are not the trivial defaults, and error measures.

A freshly built model has running mean 0 and variance 1 in every BatchNorm, which hides any
error in the folding arithmetic (the BN is then nearly the identity). Every equivalence check
here, in the tests and in benchmarks, first randomizes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from repblocks.norms import is_batch_norm_like

__all__ = ["compare_forms", "ieee_fp32", "max_errors", "randomize_bn_", "within_tolerance"]


@torch.no_grad()
def randomize_bn_(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, in place.

    Ranges keep activations of deep networks within a few orders of magnitude, so that relative
    errors stay meaningful: mean in [-0.5, 0.5], variance in [0.5, 2], weight in [0.5, 1.5], bias in [-0.5, 0.5].
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform_(tensor: Tensor, low: float, high: float) -> None:
        values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * (high - low) + low
        tensor.copy_(values)

    for module in model.modules():
        # Frozen BatchNorms (torchvision's, timm's FrozenBatchNormAct2d) too: their statistics are buffers.
        if is_batch_norm_like(module) and getattr(module, "running_mean", None) is not None:
            uniform_(module.running_mean, -0.5, 0.5)
            uniform_(module.running_var, 0.5, 2.0)
            if getattr(module, "weight", None) is not None:
                uniform_(module.weight, 0.5, 1.5)
            if getattr(module, "bias", None) is not None:
                uniform_(module.bias, -0.5, 0.5)
    return model


def max_errors(reference: Tensor, other: Tensor) -> tuple[float, float]:
    """Maximum absolute error and that error relative to the largest reference magnitude."""
    abs_err = (reference.double() - other.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    return abs_err, abs_err / scale if scale > 0 else abs_err


def within_tolerance(abs_err: float, rel_err: float, *, atol: float, rtol: float) -> bool:
    """Whether errors from :func:`max_errors` pass: absolute error at most ``atol``, or relative error at most ``rtol``.

    Either bound suffices (``torch.allclose`` adds the two, which differs by at most a factor 2):
    ``atol`` serves outputs near zero, where a relative error means little, and ``rtol`` serves
    large outputs, where float32 rounding alone exceeds any fixed ``atol``.
    """
    return abs_err <= atol or rel_err <= rtol


@contextlib.contextmanager
def ieee_fp32(enabled: bool = True) -> Iterator[None]:
    """float32 convs and matmuls in full float32 precision inside, not TF32.

    Ampere and later GPUs round float32 convs to TF32 by default (~1e-3 relative error), which
    would drown the conversion's own error (~1e-6) in any comparison. ``enabled=False`` changes
    nothing, so callers can pass a setting through.
    """
    if not enabled:
        yield
        return
    backends = [torch.backends.cudnn.conv, torch.backends.cuda.matmul]
    previous = [backend.fp32_precision for backend in backends]
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, precision in zip(backends, previous, strict=True):
            backend.fp32_precision = precision


@torch.inference_mode()
def compare_forms(
    train_form: nn.Module, deploy_form: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> dict:
    """Run both forms over labelled ``(images, labels)`` batches on ``device`` and compare them.

    Returns:
        ``images`` (count), ``max_abs_err`` and ``max_rel_err`` (worst batch, as :func:`max_errors`),
        ``top1_agreement``, ``train_accuracy`` and ``deploy_accuracy``; an empty dict when the
        batches held no images.
    """
    worst_abs = worst_rel = 0.0
    agree = train_correct = deploy_correct = count = 0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        train_logits, deploy_logits = train_form(images), deploy_form(images)
        abs_err, rel_err = max_errors(train_logits, deploy_logits)
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
        agree += (train_logits.argmax(1) == deploy_logits.argmax(1)).sum().item()
        train_correct += (train_logits.argmax(1) == labels).sum().item()
        deploy_correct += (deploy_logits.argmax(1) == labels).sum().item()
        count += labels.numel()
    if count == 0:
        return {}
    return {
        "images": count,
        "max_abs_err": worst_abs,
        "max_rel_err": worst_rel,
        "top1_agreement": agree / count,
        "train_accuracy": train_correct / count,
        "deploy_accuracy": deploy_correct / count,
    }
