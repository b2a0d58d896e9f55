"""A compact re-creation of apple's MobileOne (apple/ml-mobileone, mobileone.py, commit b7f4e6d).

Written from apple's module layout and arithmetic, not copied: the state dict keys, shapes,
forward pass and fusion are apple's, so tests can check loading across code bases against an
independent forward pass rather than against our own renaming.

Layout (train form, ``inference_mode=False``):
- ``stage0`` (the stem) and ``stage1`` .. ``stage4`` (Sequentials alternating a depthwise 3x3
  block and a pointwise 1x1 block per layer), ``gap`` (no weights) and ``linear``.
- A block has ``rbr_conv.{i}.conv/bn`` (``num_conv_branches`` kxk conv+BN, a ModuleList),
  ``rbr_scale.conv/bn`` (a 1x1 conv+BN, only when the kernel is larger than 1), ``rbr_skip`` (a
  BatchNorm2d on the input, only when shapes allow) and, in SE blocks, ``se.reduce``/``se.expand``
  (biased 1x1 convs, hidden width ``int(channels * 0.0625)``).
- Inference form: ``reparam_conv`` (biased) replaces the branches; ``se`` stays.

Apple's details kept on purpose: the stem always has one kxk branch (``num_conv_branches`` of
the variant applies to stages 1-4 only); SE pools with ``avg_pool2d(kernel_size=[h, w])`` (a global
mean; some later apple repositories pinned ``[16, 16]``, this file does not); SE sits after the
sum and before ReLU in both forms; the identity kernel is built in the BN's dtype.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

PARAMS = {  # apple's table of variants (mobileone.py, PARAMS)
    "s0": {"width_multipliers": (0.75, 1.0, 1.0, 2.0), "num_conv_branches": 4},
    "s1": {"width_multipliers": (1.5, 1.5, 2.0, 2.5)},
    "s2": {"width_multipliers": (1.5, 2.0, 2.5, 4.0)},
    "s3": {"width_multipliers": (2.0, 2.5, 3.0, 4.0)},
    "s4": {"width_multipliers": (3.0, 3.5, 3.5, 4.0), "use_se": True},
}


class AppleSEBlock(nn.Module):
    """Squeeze-excite with ``reduce``/``expand`` biased 1x1 convs, ReLU then sigmoid."""

    def __init__(self, channels, rd_ratio=0.0625):
        super().__init__()
        hidden = int(channels * rd_ratio)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=True)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, inputs):
        _, channels, height, width = inputs.size()
        squeezed = F.avg_pool2d(inputs, kernel_size=[height, width])  # (B, C, 1, 1)
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(squeezed))))
        return inputs * gate.view(-1, channels, 1, 1)


def _conv_bn(cin, cout, kernel_size, stride, padding, groups):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class AppleMobileOneBlock(nn.Module):
    """apple's MobileOneBlock: ``num_conv_branches`` kxk conv+BN, a 1x1 scale branch, a BN skip."""

    def __init__(
        self, cin, cout, kernel_size, stride=1, padding=0, groups=1, inference_mode=False, use_se=False, branches=1
    ):
        super().__init__()
        self.inference_mode = inference_mode
        self.in_channels, self.kernel_size, self.groups = cin, kernel_size, groups
        self.se = AppleSEBlock(cout) if use_se else nn.Identity()
        self.activation = nn.ReLU()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=True)
            return
        self.rbr_skip = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            _conv_bn(cin, cout, kernel_size, stride, padding, groups) for _ in range(branches)
        )
        self.rbr_scale = _conv_bn(cin, cout, 1, stride, 0, groups) if kernel_size > 1 else None

    def forward(self, x):
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        # apple's order: scale + skip first, then the kxk branches one by one.
        out = (0 if self.rbr_scale is None else self.rbr_scale(x)) + (0 if self.rbr_skip is None else self.rbr_skip(x))
        for branch in self.rbr_conv:
            out = out + branch(x)
        return self.activation(self.se(out))

    def _folded(self, branch):
        if isinstance(branch, nn.Sequential):
            kernel, norm = branch.conv.weight, branch.bn
        else:  # the skip BatchNorm: an identity kernel in the BN's dtype, as apple builds it
            per_group = self.in_channels // self.groups
            kernel = torch.zeros(
                self.in_channels, per_group, self.kernel_size, self.kernel_size, dtype=branch.weight.dtype
            )
            centre = self.kernel_size // 2
            for channel in range(self.in_channels):
                kernel[channel, channel % per_group, centre, centre] = 1
            norm = branch
        std = (norm.running_var + norm.eps).sqrt()
        return kernel * (norm.weight / std).reshape(-1, 1, 1, 1), norm.bias - norm.running_mean * norm.weight / std

    def kernel_bias(self):
        """The fused kernel and bias, summed as apple sums them: conv branches + scale + skip."""
        kernel_conv, bias_conv = 0, 0
        for branch in self.rbr_conv:
            kernel, bias = self._folded(branch)
            kernel_conv, bias_conv = kernel_conv + kernel, bias_conv + bias
        kernel_scale, bias_scale = 0, 0
        if self.rbr_scale is not None:
            kernel_scale, bias_scale = self._folded(self.rbr_scale)
            pad = self.kernel_size // 2
            kernel_scale = F.pad(kernel_scale, [pad, pad, pad, pad])
        kernel_skip, bias_skip = (0, 0) if self.rbr_skip is None else self._folded(self.rbr_skip)
        return kernel_conv + kernel_scale + kernel_skip, bias_conv + bias_scale + bias_skip

    @torch.no_grad()
    def reparameterize(self):
        """Swap the branches for ``reparam_conv`` (in the kxk conv's geometry); a no-op when fused."""
        if self.inference_mode:
            return
        kernel, bias = self.kernel_bias()
        geometry = self.rbr_conv[0].conv
        self.reparam_conv = nn.Conv2d(
            geometry.in_channels,
            geometry.out_channels,
            geometry.kernel_size,
            geometry.stride,
            geometry.padding,
            geometry.dilation,
            geometry.groups,
            bias=True,
        )
        self.reparam_conv.weight.data, self.reparam_conv.bias.data = kernel, bias
        del self.rbr_conv, self.rbr_scale, self.rbr_skip
        self.inference_mode = True


class AppleMobileOne(nn.Module):
    """``stage0`` stem, ``stage1..4`` of depthwise/pointwise block pairs, ``gap``, ``linear``."""

    def __init__(
        self,
        num_blocks_per_stage=(2, 8, 10, 1),
        num_classes=1000,
        width_multipliers=(1.0, 1.0, 1.0, 1.0),
        inference_mode=False,
        use_se=False,
        num_conv_branches=1,
    ):
        super().__init__()
        self.inference_mode, self.branches = inference_mode, num_conv_branches
        self.in_planes = min(64, int(64 * width_multipliers[0]))
        self.stage0 = AppleMobileOneBlock(3, self.in_planes, 3, 2, 1, inference_mode=inference_mode)
        # SE in the second half of stage3 and in all of stage4, when the variant asks for it.
        se_counts = (0, 0, num_blocks_per_stage[2] // 2 if use_se else 0, num_blocks_per_stage[3] if use_se else 0)
        for idx, (base, mult, count, se_count) in enumerate(
            zip((64, 128, 256, 512), width_multipliers, num_blocks_per_stage, se_counts, strict=True), start=1
        ):
            setattr(self, f"stage{idx}", self._make_stage(int(base * mult), count, se_count))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(int(512 * width_multipliers[3]), num_classes)

    def _make_stage(self, planes, count, se_count):
        blocks = []
        for idx, stride in enumerate([2] + [1] * (count - 1)):
            use_se = idx >= count - se_count
            common = {"inference_mode": self.inference_mode, "use_se": use_se, "branches": self.branches}
            blocks.append(AppleMobileOneBlock(self.in_planes, self.in_planes, 3, stride, 1, self.in_planes, **common))
            blocks.append(AppleMobileOneBlock(self.in_planes, planes, 1, 1, 0, 1, **common))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x):
        for idx in range(5):
            x = getattr(self, f"stage{idx}")(x)
        return self.linear(self.gap(x).flatten(1))


def mobileone(*, variant="s0", num_classes=1000, inference_mode=False):
    """apple's builder: one of ``PARAMS`` (s0..s4), train form or inference form."""
    return AppleMobileOne(num_classes=num_classes, inference_mode=inference_mode, **PARAMS[variant])


def reparameterize_model(model):
    """A fused deep copy, as apple's ``reparameterize_model``: every block that can fuses itself."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "reparameterize"):
            module.reparameterize()
    return model
