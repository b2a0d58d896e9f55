"""Conv then training-mode BatchNorm, keeping only the conv's input and kernel for the backward pass.

The online block's training step is ``bn(conv(x, kernel))``. Autograd would keep the conv output for
BatchNorm's backward: one feature map per block, on top of the block's output (which the next
layer keeps). Here that map is computed again in the backward pass from the input (kept anyway,
by the previous layer or as the batch) and the kernel (a few KiB): one more conv per step, and the
block holds no map of its own between forward and backward. BatchNorm's backward is then written
out, in place on the recomputed map, so that the backward pass holds three maps at its peak
(the incoming gradient, the recomputed map turned into its gradient, the input's gradient) where
aten's would hold five. The forward is ``F.batch_norm(F.conv2d(...))``'s own ATen kernels, running
statistics included; the gradients are the same algebra, summed in another order.
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
        stride, padding, groups, _ = ctx.geometry
        need = ctx.needs_input_grad
        channel = (1, -1, 1, 1)
        # The conv output again, turned into the BN's normalized input and then into its gradient in place:
        # aten's BN backward would allocate its result and a temporary beside it, two maps more at the peak.
        normalized = F.conv2d(x, kernel, None, stride, padding, 1, groups)
        normalized.sub_(mean.to(normalized.dtype).reshape(channel)).mul_(invstd.to(normalized.dtype).reshape(channel))
        count = normalized.numel() // normalized.shape[1]
        grad_bias = grad_out.sum((0, 2, 3))  # (C,)
        grad_weight = _channel_dot(grad_out, normalized)  # (C,)
        # d bn / d conv = weight * invstd * (grad - mean(grad) - normalized * mean(grad * normalized))
        gain = (weight * invstd).to(normalized.dtype)  # (C,)
        grad_conv = normalized.mul_((-gain * grad_weight / count).reshape(channel))
        grad_conv.addcmul_(grad_out, gain.reshape(channel)).sub_((gain * grad_bias / count).reshape(channel))
        grad_x, grad_kernel = _conv_backward(grad_conv, x, kernel, (stride, padding, groups), need[:2])
        grad_weight = grad_weight.to(weight.dtype) if need[2] else None
        grad_bias = grad_bias.to(weight.dtype) if need[3] else None
        return grad_x, grad_kernel, grad_weight, grad_bias, None, None, None, None, None, None, None


def _channel_dot(a: Tensor, b: Tensor, *, pieces: int = 8) -> Tensor:
    """``(a * b).sum((0, 2, 3))`` with no temporary larger than about ``1 / pieces`` of ``a``.

    Split along the batch, and along the rows too when the batch has fewer than ``pieces`` samples.
    """
    total = a.new_zeros(a.shape[1])
    rows = max(1, -(-pieces // a.shape[0]))  # row splits per sample
    samples = min(pieces, a.shape[0])
    for a_part, b_part in zip(a.tensor_split(samples), b.tensor_split(samples), strict=True):
        for a_rows, b_rows in zip(a_part.tensor_split(rows, dim=2), b_part.tensor_split(rows, dim=2), strict=True):
            total += (a_rows * b_rows).sum((0, 2, 3))
    return total


def _conv_backward(
    grad_conv: Tensor, x: Tensor, kernel: Tensor, geometry: tuple[int, int, int], need: tuple[bool, bool]
) -> tuple[Tensor | None, Tensor | None]:
    """The conv's input and kernel gradients; on the CPU in NCHW, an eighth of the batch at a time.

    oneDNN computes an NCHW conv's backward in its own blocked layout, with copies of the gradient,
    the input and the result beside them: two maps more at the step's peak, for the whole batch at
    once. In pieces, those copies are a piece's size; the sums and the results are the same.
    """
    stride, padding, groups = geometry

    def backward(grad_part: Tensor, x_part: Tensor) -> tuple[Tensor | None, Tensor | None]:
        grads = torch.ops.aten.convolution_backward(
            grad_part, x_part, kernel, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups,
            [need[0], need[1], False],
        )  # fmt: skip
        return grads[0], grads[1]

    pieces = min(8, x.shape[0])
    if x.device.type != "cpu" or x.is_contiguous(memory_format=torch.channels_last) or pieces == 1:
        return backward(grad_conv, x)
    grad_x = torch.empty_like(x) if need[0] else None
    grad_kernel = None
    start = 0
    for grad_part, x_part in zip(grad_conv.tensor_split(pieces), x.tensor_split(pieces), strict=True):
        part_x, part_kernel = backward(grad_part, x_part)
        if grad_x is not None:
            grad_x[start : start + x_part.shape[0]] = part_x
        if part_kernel is not None:
            grad_kernel = part_kernel if grad_kernel is None else grad_kernel.add_(part_kernel)
        start += x_part.shape[0]
        del part_x, part_kernel
    return grad_x, grad_kernel
