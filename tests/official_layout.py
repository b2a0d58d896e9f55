"""A compact stand-in for the official RepVGG code's modules (DingXiaoH/RepVGG, repvgg.py).

Written from the official module layout, not copied: ``stage0`` .. ``stage4`` of blocks with
``rbr_dense``/``rbr_1x1`` (conv+bn Sequentials), ``rbr_identity`` (BatchNorm2d), ``rbr_reparam``
in deploy form, optional ``se.down``/``se.up``, and a ``linear`` classifier. It produces
state dicts and outputs of that layout, so tests check loading across code bases against an
independent forward pass rather than against our own renaming.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin, cout, k, stride, groups):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class _SEBlock(nn.Module):
    def __init__(self, channels, hidden):
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        s = F.avg_pool2d(x, kernel_size=x.size(3))
        return x * torch.sigmoid(self.up(F.relu(self.down(s))))


class OfficialBlock(nn.Module):
    def __init__(self, cin, cout, stride, groups, use_se, deploy):
        super().__init__()
        self.se = _SEBlock(cout, cout // 16) if use_se else nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
            self.rbr_dense = _conv_bn(cin, cout, 3, stride, groups)
            self.rbr_1x1 = _conv_bn(cin, cout, 1, stride, groups)

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return F.relu(self.se(self.rbr_reparam(x)))
        identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return F.relu(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + identity))


class OfficialRepVGG(nn.Module):
    def __init__(self, num_blocks, widths, groups_map=None, use_se=False, num_classes=10, deploy=False):
        super().__init__()
        groups_map = groups_map or {}
        planes = min(64, int(64 * widths[0]))
        self.stage0 = OfficialBlock(3, planes, 2, 1, use_se, deploy)
        layer = 1
        for idx, (count, base, mult) in enumerate(zip(num_blocks, (64, 128, 256, 512), widths, strict=True), start=1):
            blocks = []
            for stride in [2] + [1] * (count - 1):
                out = int(base * mult)
                blocks.append(OfficialBlock(planes, out, stride, groups_map.get(layer, 1), use_se, deploy))
                planes, layer = out, layer + 1
            setattr(self, f"stage{idx}", nn.Sequential(*blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        for idx in range(5):
            x = getattr(self, f"stage{idx}")(x)
        return self.linear(self.gap(x).flatten(1))
