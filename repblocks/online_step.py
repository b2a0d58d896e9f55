"""Conv then training-mode BatchNorm, keeping only the conv's input and kernel for the backward pass.

The online block's training step is ``bn(conv(x, kernel))``. Autograd would keep the conv output for
BatchNorm's backward: one feature map per block, on top of the block's output (which the next
layer keeps). Here that map is computed again in the backward pass from the input (kept anyway,
by the previous layer or as the batch) and the kernel (a few KiB): one more conv per step, and the
block holds no map of its own between forward and backward. The result and the gradients are
those of ``F.batch_norm(F.conv2d(...))`` (the same ATen kernels, run on the same values), running
statistics included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["conv_batch_norm", "recomputes"]


def recomputes(x: Tensor, bn: nn.BatchNorm2d) -> bool:
    """Whether :func:`conv_batch_norm` applies: a BN on batch statistics, autograd on, no autocast.

    Under autocast the conv would run in another dtype in the forward than in the recomputation
    (the backward runs outside autocast): the plain path is taken there instead.
    """
    batch_stats = bn.training or bn.running_mean is None
    return batch_stats and torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)


def conv_batch_norm(x: Tensor, kernel: Tensor, bn: nn.BatchNorm2d, *, stride: int, padding: int, groups: int) -> Tensor:
    """``bn(F.conv2d(x, kernel, ...))`` for a BN on batch statistics, with the conv output recomputed in backward.

    Updates ``bn``'s running statistics and step count as ``bn`` itself would.
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # a cumulative average, as _BatchNorm.forward computes it
            momentum = 1.0 / float(bn.num_batches_tracked)
    update = bn.training and bn.track_running_stats
    running_mean = bn.running_mean if update else None
    running_var = bn.running_var if update else None
    return _ConvBatchNorm.apply(
        x, kernel, bn.weight, bn.bias, running_mean, running_var, momentum, bn.eps, stride, padding, groups
    )


class _ConvBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, weight, bias, running_mean, running_var, momentum, eps, stride, padding, groups):
        conv = F.conv2d(x, kernel, None, stride, padding, 1, groups)  # (B, C_out, H', W'), not kept
        out, mean, invstd = torch.native_batch_norm(conv, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, kernel, weight, mean, invstd)
        ctx.geometry = (stride, padding, groups, eps)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, kernel, weight, mean, invstd = ctx.saved_tensors
        stride, padding, groups, eps = ctx.geometry
        need = ctx.needs_input_grad
        conv = F.conv2d(x, kernel, None, stride, padding, 1, groups)
        grad_conv, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_out, conv, weight, None, None, mean, invstd, True, eps, [True, need[2], need[3]]
        )
        del conv, grad_out  # the recomputed map goes before the conv's gradients are made
        grad_x, grad_kernel, _ = torch.ops.aten.convolution_backward(
            grad_conv, x, kernel, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups,
            [need[0], need[1], False],
        )  # fmt: skip
        return grad_x, grad_kernel, grad_weight, grad_bias, None, None, None, None, None, None, None
