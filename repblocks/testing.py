"""Helpers for checking conversions: BatchNorm statistics that are not the trivial defaults, and error measures.

A freshly built model has running mean 0 and variance 1 in every BatchNorm, which hides any
error in the folding arithmetic (the BN is then nearly the identity). Every equivalence check
here, in the tests and in benchmarks, first randomizes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ieee_fp32", "max_errors", "randomize_bn_", "within_tolerance"]


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
        if isinstance(module, _BatchNorm) and module.running_mean is not None:
            uniform_(module.running_mean, -0.5, 0.5)
            uniform_(module.running_var, 0.5, 2.0)
            if module.affine:
                uniform_(module.weight, 0.5, 1.5)
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
