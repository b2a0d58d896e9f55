"""Branches that are sequences: DBB's 1x1 -> kxk conv and 1x1 -> kxk average pool, each with BNs.

Diverse Branch Block (Ding, Zhang, Han, Ding. CVPR 2021, https://arxiv.org/abs/2103.13425;
DingXiaoH/DiverseBranchBlock, ``diversebranchblock.py``). A 1x1 conv, a BN, then a kxk conv (or
pool) and a BN is one kxk conv, but only if the kxk stage's padding carries what the first BN gives
a zero input: zero padding of the BN's output would be the fused conv's padding *minus* the BN's
shift. Both modules here pad that way (DBB's ``BNAndPadLayer``), so the train form and the fused
conv agree at the borders too. The shift is taken with the running statistics, in training as
well, as DBB does; unlike DBB it is not detached, so that in eval mode the train form's gradients
are those of the fused conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repblocks.fusion import SequenceBranch, identity_kernel, wide_dtype

__all__ = ["AvgSequence", "ConvSequence", "IdentityConv1x1", "pad_with_bn_shift"]


def pad_with_bn_shift(x: Tensor, bn: nn.BatchNorm2d, pad: int) -> Tensor:
    """Pad ``bn``'s output ``x`` by ``pad`` on each side with what ``bn`` gives a zero input (per channel)."""
    if pad == 0:
        return x
    shift = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C,)
    height, width = x.shape[-2] + 2 * pad, x.shape[-1] + 2 * pad
    border = torch.ones(height, width, dtype=x.dtype, device=x.device)
    border[pad:-pad, pad:-pad] = 0
    # Adding exact zeros inside and exact zeros plus the shift outside: no rounding anywhere.
    return F.pad(x, [pad] * 4) + shift.reshape(1, -1, 1, 1) * border  # (B, C, H + 2 pad, W + 2 pad)


class IdentityConv1x1(nn.Conv2d):
    """A bias-free 1x1 conv whose kernel is the identity plus ``weight`` (zero at init): DBB's ``IdentityBasedConv1x1``.

    The sequence then starts as a plain kxk conv; weight decay pulls it towards the identity, not zero.
    """

    def __init__(self, channels: int, *, groups: int = 1):
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        nn.init.zeros_(self.weight)

    def kernel(self, dtype: torch.dtype | None = None) -> Tensor:
        """The effective kernel, identity included, in ``dtype`` (by default the weight's)."""
        dtype = dtype or self.weight.dtype
        eye = identity_kernel(self.out_channels, 1, groups=self.groups, dtype=dtype, device=self.weight.device)
        return self.weight.to(dtype) + eye

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.kernel(), groups=self.groups)


class ConvSequence(nn.Module):
    """1x1 Conv+BN -> kxk Conv+BN (DBB's ``dbb_1x1_kxk``): ``conv1``, ``bn1``, ``conv2``, ``bn2``.

    As DBB: the middle width is ``in_channels``, with an identity-based 1x1 (:class:`IdentityConv1x1`),
    unless the block is depthwise (``groups >= out_channels``), where it is ``2 * in_channels`` with a
    plain 1x1 (DBB: "for mobilenet, it is better to have 2X internal channels"). Both convs take the
    block's groups; the kxk one its stride. ``bn_eps`` is every BN's epsilon.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        bn_eps: float = 1e-5,
    ):
        super().__init__()
        middle = in_channels if groups < out_channels else 2 * in_channels
        if middle == in_channels:
            self.conv1 = IdentityConv1x1(in_channels, groups=groups)
        else:
            self.conv1 = nn.Conv2d(in_channels, middle, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(middle, eps=bn_eps)
        self.conv2 = nn.Conv2d(middle, out_channels, kernel_size, stride=stride, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=bn_eps)

    def forward(self, x: Tensor) -> Tensor:
        middle = pad_with_bn_shift(self.bn1(self.conv1(x)), self.bn1, self.conv2.kernel_size[0] // 2)
        return self.bn2(self.conv2(middle))

    def fusion_part(self) -> SequenceBranch:
        """What :func:`repblocks.fusion.equivalent_kernel_bias` needs of this branch."""
        first = self.conv1.weight
        if isinstance(self.conv1, IdentityConv1x1):  # identity added in float64, so fusion rounds once
            first = self.conv1.kernel(wide_dtype(first.device))
        return SequenceBranch(first, self.bn1, self.conv2.weight, self.bn2)


class AvgSequence(nn.Module):
    """1x1 Conv+BN -> kxk average pool -> BN (DBB's ``dbb_avg``): ``conv``, ``bn``, ``avg``, ``avgbn``.

    The pool takes the block's stride. As DBB, a depthwise block (``groups >= out_channels``, with
    ``in_channels == out_channels``) has no 1x1 Conv+BN, whose per-channel affine map ``avgbn``
    already gives: its pool reads the input, zero-padded. ``bn_eps`` is every BN's epsilon.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        bn_eps: float = 1e-5,
    ):
        super().__init__()
        self.pad = kernel_size // 2
        self.conv = self.bn = None
        if groups < out_channels or in_channels != out_channels:
            self.conv = nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)
            self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.avg = nn.AvgPool2d(kernel_size, stride=stride, padding=0 if self.conv is not None else self.pad)
        self.avgbn = nn.BatchNorm2d(out_channels, eps=bn_eps)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            x = pad_with_bn_shift(self.bn(self.conv(x)), self.bn, self.pad)
        return self.avgbn(self.avg(x))

    def fusion_part(self) -> SequenceBranch:
        """What :func:`repblocks.fusion.equivalent_kernel_bias` needs of this branch."""
        first = self.conv.weight if self.conv is not None else None
        return SequenceBranch(first, self.bn, self.avg.kernel_size, self.avgbn)
