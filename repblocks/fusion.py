"""The re-parameterization arithmetic, as pure functions on tensors.

Everything here is exact algebra on linear maps:

* a convolution followed by an eval-mode BatchNorm is one convolution with a bias;
* a 1x1 kernel is a kxk kernel that is zero outside its centre;
* the identity map is a kxk kernel with a single 1 per output channel (for any ``groups``);
* a stride-1 average pool is a kxk kernel with ``1 / k**2`` at every tap of a channel's own input;
* a BatchNorm after a sum of convolutions folds into the summed kernel like any Conv+BN pair;
* convolutions over the same input with the same stride add up kernel-wise.

The arithmetic runs in float64 and is cast back once at the end, so a model that is already
in fp16/bf16 converts as accurately as its own dtype allows. (``torch.nn.utils.fusion`` does
the BN fold in the weight's own dtype and returns detached ``Parameter`` objects, which rules it
out here: training differentiates through ``equivalent_kernel_bias`` for the RepVGG L2 penalty.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "bn_scale_shift",
    "equivalent_kernel_bias",
    "fold_bn",
    "fused_kernel_bias",
    "fuse_conv_bn",
    "identity_kernel",
    "pad_kernel",
    "wide_dtype",
]


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype the folding arithmetic runs in: float64, except where the device lacks it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def bn_scale_shift(bn: nn.Module, conv_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` with ``bn(y + conv_bias) == y * scale + shift`` in eval mode, in float64.

    Args:
        bn: A BatchNorm-like module with ``running_mean``, ``running_var``, ``eps`` and
            optional affine ``weight``/``bias`` (``nn.BatchNorm*d``, ``SyncBatchNorm``,
            torchvision's ``FrozenBatchNorm2d``).
        conv_bias: Bias added before the BatchNorm, if any.
    """
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        raise ValueError(f"cannot fold {type(bn).__name__}: it has no running statistics (track_running_stats=False?)")
    wide = wide_dtype(bn.running_mean.device)
    mean = bn.running_mean.to(wide)
    std = (bn.running_var.to(wide) + bn.eps).sqrt()
    gamma = bn.weight.to(wide) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.to(wide) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / std  # (C,)
    centred = conv_bias.to(wide) - mean if conv_bias is not None else -mean
    return scale, centred * scale + beta


def fold_bn(kernel: Tensor, bn: nn.Module, conv_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm that follows a convolution into the convolution.

    ``bn(conv(x)) == conv(x; kernel * s) + (conv_bias - mean) * s + beta`` with
    ``s = gamma / sqrt(var + eps)``, per output channel.

    Args:
        kernel: Convolution weight, ``(C_out, C_in / groups, *kernel_dims)``.
        bn: The BatchNorm (see :func:`bn_scale_shift` for what qualifies).
        conv_bias: The convolution's own bias, if it has one.

    Returns:
        ``(kernel, bias)`` in float64 (the wide dtype); callers cast once when done.
    """
    scale, shift = bn_scale_shift(bn, conv_bias)
    # A float32 kernel times a float64 vector promotes to float64 in one pass, with no float64 copy first.
    return kernel * scale.reshape(-1, *([1] * (kernel.dim() - 1))), shift


def fuse_conv_bn(conv: nn.Module, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Weight and bias of the single convolution equal to ``bn(conv(x))`` in eval mode.

    Returned in the convolution weight's dtype.
    """
    kernel, bias = fold_bn(conv.weight, bn, conv.bias)
    return kernel.to(conv.weight.dtype), bias.to(conv.weight.dtype)


def pad_kernel(kernel: Tensor, kernel_size: int) -> Tensor:
    """Zero-pad a square (odd) kernel, e.g. 1x1, to ``kernel_size`` x ``kernel_size`` around its centre."""
    pad = (kernel_size - kernel.shape[-1]) // 2
    if pad < 0 or kernel.shape[-1] % 2 != kernel_size % 2:
        raise ValueError(f"cannot centre a {kernel.shape[-1]}x{kernel.shape[-1]} kernel in {kernel_size}x{kernel_size}")
    return F.pad(kernel, [pad, pad, pad, pad]) if pad else kernel


def identity_kernel(
    channels: int,
    kernel_size: int = 3,
    *,
    groups: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The kxk kernel of a (grouped) convolution that maps its input to itself.

    Output channel ``c`` reads input channel ``c % (channels // groups)`` of its own group,
    with a 1 at the kernel centre. Built in the requested dtype and device, so an fp16 or
    CUDA model never sees a float32 CPU tensor (a known bug of the official code).
    """
    if channels % groups:
        raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=dtype, device=device)
    out_idx = torch.arange(channels, device=device)
    centre = kernel_size // 2
    kernel[out_idx, out_idx % per_group, centre, centre] = 1
    return kernel


def equivalent_kernel_bias(
    conv_branches: list[tuple[Tensor, nn.Module | None]],
    identity: nn.Module | None,
    *,
    kernel_size: int,
    avg_pool: int | None = None,
    post_bn: nn.Module | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum parallel convolution branches (and identity, average pool, a BN after the sum) into one kernel and bias.

    The result equals padding every kernel to ``kernel_size`` (:func:`pad_kernel`), folding each
    branch's BN (:func:`fold_bn`), adding the identity (:func:`identity_kernel`, through its BN if
    it has one) and the average pool (``1 / size**2`` at every tap of each channel's own input),
    summing it all and folding ``post_bn`` into the sum. Smaller kernels, the identity and the pool
    are added into the centre instead of being materialized.

    Differentiable with respect to the kernels and the BN affine parameters (the RepVGG L2
    penalty needs that). The sum is formed in float64 and cast back to the first kernel's dtype.

    Args:
        conv_branches: ``(kernel, bn)`` pairs of square, odd kernels up to ``kernel_size``; ``bn``
            is None for a plain bias-free convolution (QARepVGG's 1x1 branch).
        identity: The identity branch: a BatchNorm applied to the input (RepVGG, MobileOne),
            ``nn.Identity`` for the plain identity (QARepVGG), or None for none.
        kernel_size: Size of the fused square kernel. The groups need no argument: the kernels'
            second dimension (input channels per group) says where the identity's 1s go.
        avg_pool: Side of a stride-1 average pool over each channel (padding ``size // 2``, padded
            zeros counted, as ``nn.AvgPool2d``'s default): QARepVGG v2's branch. None for none.
        post_bn: A BatchNorm applied to the branch sum (QARepVGG), or None.
    """
    dtype = conv_branches[0][0].dtype
    parts = _Parts.of(conv_branches, identity, avg_pool, post_bn)
    out_channels = conv_branches[0][0].shape[0]
    kernel, bias = parts.sum(range(out_channels), kernel_size)
    return kernel.to(dtype), bias.to(dtype)


@torch.no_grad()
def fused_kernel_bias(
    conv_branches: list[tuple[Tensor, nn.Module | None]],
    identity: nn.Module | None,
    *,
    kernel_size: int,
    avg_pool: int | None = None,
    post_bn: nn.Module | None = None,
    rows_per_chunk: int = 64,
) -> tuple[Tensor, Tensor]:
    """The same values as :func:`equivalent_kernel_bias`, without autograd, for conversion.

    Works through the output channels a chunk at a time, so the float64 intermediates stay small
    and reuse memory: converting a large model is dominated by fresh page allocations otherwise
    (RepVGG-B3: several seconds unchunked, a fraction of a second chunked).
    """
    first_kernel = conv_branches[0][0]
    out_channels = first_kernel.shape[0]
    parts = _Parts.of(conv_branches, identity, avg_pool, post_bn)
    kernel = first_kernel.new_empty(out_channels, first_kernel.shape[1], kernel_size, kernel_size)
    bias = first_kernel.new_empty(out_channels)
    for start in range(0, out_channels, rows_per_chunk):
        rows = range(start, min(start + rows_per_chunk, out_channels))
        kernel[start : rows.stop], bias[start : rows.stop] = parts.sum(rows, kernel_size)
    return kernel, bias


Affine = tuple[Tensor, Tensor] | None  # per-channel (scale, shift) in float64; None for the plain map


@dataclass
class _Parts:
    """A block's branches reduced to what fusion needs: kernels with their per-channel affine maps."""

    convs: list[tuple[Tensor, Affine]]
    identity: Affine | bool  # False: no identity branch; None: the plain identity
    avg_pool: int | None
    post: Affine

    @classmethod
    def of(cls, conv_branches, identity, avg_pool, post_bn) -> _Parts:
        def affine(module: nn.Module | None) -> Affine:
            return None if module is None or isinstance(module, nn.Identity) else bn_scale_shift(module)

        if not conv_branches:
            raise ValueError("a re-parameterizable block needs at least one convolution branch")
        return cls(
            convs=[(kernel, affine(bn)) for kernel, bn in conv_branches],
            identity=False if identity is None else affine(identity),
            avg_pool=avg_pool,
            post=affine(post_bn),
        )

    def sum(self, rows: range, kernel_size: int) -> tuple[Tensor, Tensor]:
        """Float64 kernel and bias of output channels ``rows``."""
        centre = kernel_size // 2
        out_slice = slice(rows.start, rows.stop)
        kernel = bias = None
        for branch_kernel, affine in sorted(self.convs, key=lambda branch: -branch[0].shape[-1]):
            size = branch_kernel.shape[-1]
            if size % 2 != 1 or size > kernel_size:
                raise ValueError(f"cannot centre a {size}x{size} kernel in {kernel_size}x{kernel_size}")
            wide = wide_dtype(branch_kernel.device)
            if affine is None:
                folded, shift = branch_kernel[out_slice].to(wide, copy=True), None  # never a view of the weight
            else:
                scale, shift = affine[0][out_slice], affine[1][out_slice]
                folded = branch_kernel[out_slice].to(scale.dtype) * scale.reshape(-1, 1, 1, 1)
            if kernel is None:  # the largest branch; a fresh tensor, so adding into it in place is safe
                kernel = pad_kernel(folded, kernel_size)
                bias = shift if shift is not None else kernel.new_zeros(len(rows))
            else:
                lo, hi = centre - size // 2, centre + size // 2 + 1
                kernel[..., lo:hi, lo:hi] += folded
                bias = bias + shift if shift is not None else bias
        # Identity and average pool read each output channel's own input channel: c % (inputs per group).
        out_idx = torch.arange(rows.start, rows.stop, device=kernel.device)
        local_idx, in_idx = out_idx - rows.start, out_idx % kernel.shape[1]
        if self.identity is not False:
            centre_idx = torch.full_like(out_idx, centre)
            scale = self.identity[0][out_slice] if self.identity is not None else kernel.new_ones(len(rows))
            kernel.index_put_((local_idx, in_idx, centre_idx, centre_idx), scale, accumulate=True)
            bias = bias + self.identity[1][out_slice] if self.identity is not None else bias
        if self.avg_pool is not None:
            size = self.avg_pool
            if size % 2 != 1 or size > kernel_size:
                raise ValueError(f"cannot centre a {size}x{size} average pool in {kernel_size}x{kernel_size}")
            lo, hi = centre - size // 2, centre + size // 2 + 1
            kernel[local_idx, in_idx, lo:hi, lo:hi] += 1.0 / size**2  # (rows, size, size): one window per channel
        if self.post is not None:
            scale, shift = self.post[0][out_slice], self.post[1][out_slice]
            kernel, bias = kernel * scale.reshape(-1, 1, 1, 1), bias * scale + shift
        return kernel, bias
