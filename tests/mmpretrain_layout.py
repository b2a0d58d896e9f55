"""A compact stand-in for mmpretrain's RepVGG classifier (open-mmlab/mmpretrain, models/backbones/repvgg.py).

Written from mmpretrain's published module layout, not copied: an ``ImageClassifier`` with a
``backbone`` (``stem`` and ``stage_1`` .. ``stage_4`` of blocks), a parameter-free pooling neck
and a ``head.fc`` linear layer. A block in train form has ``branch_3x3`` and ``branch_1x1``
(Sequentials of ``conv`` and ``norm``) and, when shapes allow, ``branch_norm`` (a BatchNorm on
the input); in deploy form only ``branch_reparam``. Its optional ``se_layer`` has ``conv1.conv``
and ``conv2.conv`` (ConvModules without norm: a biased 1x1 conv each, then ReLU and sigmoid).
Like mmpretrain's block it has both ``reparameterize()``, which only returns the fused kernel
and bias, and ``switch_to_deploy()``, which swaps the branches for ``branch_reparam``.

Outputs come from this module's own forward pass, so tests check loading across code bases
against an independent computation rather than against our own renaming.
"""

import torch
import torch.nn.functional as F
from torch import nn


class _ConvModule(nn.Module):
    """mmcv's ConvModule without a norm: the conv sits under ``conv``, the activation has no weights."""

    def __init__(self, cin, cout, act):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=True)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


class _SELayer(nn.Module):
    def __init__(self, channels, ratio=16):
        super().__init__()
        hidden = max(1, channels // ratio)  # mmpretrain's make_divisible(channels // ratio, divisor=1) for RepVGG
        self.conv1 = _ConvModule(channels, hidden, nn.ReLU())
        self.conv2 = _ConvModule(hidden, channels, nn.Sigmoid())

    def forward(self, x):
        return x * self.conv2(self.conv1(x.mean(dim=(2, 3), keepdim=True)))


def _conv_norm(cin, cout, k, stride, groups):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("norm", nn.BatchNorm2d(cout))
    return seq


class MMBlock(nn.Module):
    def __init__(self, cin, cout, stride, groups, use_se, deploy):
        super().__init__()
        self.cin, self.cout, self.stride, self.groups, self.deploy = cin, cout, stride, groups, deploy
        if deploy:
            self.branch_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
        else:
            self.branch_norm = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
            self.branch_3x3 = _conv_norm(cin, cout, 3, stride, groups)
            self.branch_1x1 = _conv_norm(cin, cout, 1, stride, groups)
        self.se_layer = _SELayer(cout) if use_se else None

    def forward(self, x):
        if self.deploy:
            # As mmpretrain's block does: in deploy form the SE layer is not applied (its train form applies it).
            return F.relu(self.branch_reparam(x))
        out = self.branch_3x3(x) + self.branch_1x1(x)
        if self.branch_norm is not None:
            out = out + self.branch_norm(x)
        if self.se_layer is not None:
            out = self.se_layer(out)
        return F.relu(out)

    def reparameterize(self):
        """The fused kernel and bias; the block itself is unchanged."""
        kernel, bias = self._folded(self.branch_3x3.conv.weight, self.branch_3x3.norm)
        kernel_1x1, bias_1x1 = self._folded(self.branch_1x1.conv.weight, self.branch_1x1.norm)
        kernel, bias = kernel + F.pad(kernel_1x1, [1, 1, 1, 1]), bias + bias_1x1
        if self.branch_norm is not None:
            per_group = self.cin // self.groups
            eye = torch.zeros(self.cin, per_group, 3, 3, dtype=kernel.dtype)
            for channel in range(self.cin):
                eye[channel, channel % per_group, 1, 1] = 1
            kernel_id, bias_id = self._folded(eye, self.branch_norm)
            kernel, bias = kernel + kernel_id, bias + bias_id
        return kernel, bias

    @staticmethod
    def _folded(kernel, norm):
        scale = norm.weight / (norm.running_var + norm.eps).sqrt()
        return kernel * scale.reshape(-1, 1, 1, 1), norm.bias - norm.running_mean * scale

    @torch.no_grad()
    def switch_to_deploy(self):
        if self.deploy:
            return
        kernel, bias = self.reparameterize()
        self.branch_reparam = nn.Conv2d(self.cin, self.cout, 3, self.stride, 1, groups=self.groups, bias=True)
        self.branch_reparam.weight.copy_(kernel)
        self.branch_reparam.bias.copy_(bias)
        del self.branch_3x3, self.branch_1x1, self.branch_norm
        self.deploy = True


class MMBackbone(nn.Module):
    def __init__(self, num_blocks, widths, group_layer_map, use_se, deploy):
        super().__init__()
        channels = min(64, int(64 * widths[0]))
        self.stem = MMBlock(3, channels, 2, 1, use_se, deploy)
        layer = 1
        for idx, (count, mult) in enumerate(zip(num_blocks, widths, strict=True)):
            out = int(64 * 2**idx * mult)
            blocks = []
            for block_idx in range(count):
                groups = group_layer_map.get(layer, 1)
                blocks.append(MMBlock(channels, out, 2 if block_idx == 0 else 1, groups, use_se, deploy))
                channels, layer = out, layer + 1
            self.add_module(f"stage_{idx + 1}", nn.Sequential(*blocks))
        self.out_channels = channels

    def forward(self, x):
        x = self.stem(x)
        for idx in range(1, 5):
            x = getattr(self, f"stage_{idx}")(x)
        return (x,)  # out_indices=(3,): the last stage only

    def switch_to_deploy(self):
        for module in self.modules():
            if isinstance(module, MMBlock):
                module.switch_to_deploy()


class _LinearClsHead(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, feats):
        return self.fc(feats[-1])


class MMImageClassifier(nn.Module):
    """``backbone`` -> global average pooling neck (no weights) -> ``head.fc``."""

    def __init__(self, num_blocks, widths, group_layer_map=None, use_se=False, num_classes=10, deploy=False):
        super().__init__()
        self.backbone = MMBackbone(num_blocks, widths, group_layer_map or {}, use_se, deploy)
        self.head = _LinearClsHead(self.backbone.out_channels, num_classes)

    def forward(self, x):
        feats = tuple(feat.mean(dim=(2, 3)) for feat in self.backbone(x))
        return self.head(feats)
