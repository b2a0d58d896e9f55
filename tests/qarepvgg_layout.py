"""The QARepVGG authors' network, re-created from their code (cxxgtxy/QARepVGG, repvgg.py, commit b88def2).

Written from https://github.com/cxxgtxy/QARepVGG/blob/b88def239a435b62540157b8edde2513a1a32fb4/repvgg.py
(MIT), keeping its module names, shapes, forward order and fusion arithmetic, so tests check our
layouts against the keys and outputs of the authors' own network rather than against our renaming:

- ``RepVGG``: the official RepVGG network (``stage0`` .. ``stage4``, ``gap``, ``linear``; grouped
  convs on layers 2, 4, ... with ``override_groups_map``) built from any block class.
- ``QARepVGGBlockV2``: the authors' default QARepVGG block ("only add bn for 3*3 before fusion. This is
  the default implementation for QARepVGG", and the one ``train_QAV2_B0.sh`` trains). ``rbr_dense`` is the
  official ``conv_bn`` Sequential (``conv``, ``bn``), ``rbr_1x1`` a plain bias-free conv, ``rbr_identity``
  an ``nn.Identity`` where shapes allow, and ``bn`` a BatchNorm applied after the sum:
  ``relu(bn(se(dense + 1x1 + identity)))``. It is our ``qarepvgg`` branch set (YOLOv6's QARepVGGBlock);
  the authors' "V2" is not YOLOv6's QARepVGGBlockV2, which adds an average pool (our ``qarepvgg_v2``).
- Deploy form: ``switch_to_deploy`` folds ``bn`` into ``rbr_reparam`` and deletes it (YOLOv6 keeps it).

Left out as no test needs them: drop path (identity at the default ratio 0 and in eval mode), the
custom L2, the ablation blocks (V1, V3..V15, GRE). SE is ``nn.Identity`` here; the authors apply their
``bn`` after SE, where ours applies ``post_bn`` before it, so only SE-free networks are compared.
One deliberate difference: the identity kernel takes the model's dtype (the authors build it in
float32 with numpy), which is the same in float32 and exact in float64.
"""

import copy

import torch
from torch import nn


def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=1):
    """The official ``conv_bn``: a Sequential of a bias-free ``conv`` and ``bn``."""
    result = nn.Sequential()
    result.add_module(
        "conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
    )
    result.add_module("bn", nn.BatchNorm2d(out_channels))
    return result


class RepVGGBlock(nn.Module):
    """The official block the authors' blocks derive from: 3x3 conv_bn + 1x1 conv_bn + BN identity, ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, deploy=False):
        super().__init__()
        if kernel_size != 3 or padding != 1:
            raise ValueError("the authors' blocks take kernel_size=3 and padding=1 only")
        self.deploy, self.groups, self.in_channels = deploy, groups, in_channels
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels, out_channels, 3, stride, padding, groups=groups, bias=True)
        else:
            shapes_allow = out_channels == in_channels and stride == 1
            self.rbr_identity = nn.BatchNorm2d(in_channels) if shapes_allow else None
            self.rbr_dense = conv_bn(in_channels, out_channels, 3, stride, padding, groups)
            self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, padding - 3 // 2, groups)


class QARepVGGBlockV2(RepVGGBlock):
    """The authors' default QARepVGG block: BN only on the 3x3 branch, a plain 1x1 and identity, ``bn`` after the sum."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, deploy=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, deploy)
        if not deploy:
            self.bn = nn.BatchNorm2d(out_channels)
            self.rbr_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, groups=groups, bias=False)
            self.rbr_identity = nn.Identity() if out_channels == in_channels and stride == 1 else None

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        identity = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + identity)))

    def get_equivalent_kernel_bias(self):
        """3x3 Conv+BN folded, plus the padded 1x1 and the identity, then ``bn`` folded into the sum."""
        dense = self.rbr_dense
        std = (dense.bn.running_var + dense.bn.eps).sqrt()
        kernel = dense.conv.weight * (dense.bn.weight / std).reshape(-1, 1, 1, 1)
        bias = dense.bn.bias - dense.bn.running_mean * dense.bn.weight / std
        kernel = kernel + nn.functional.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        if self.rbr_identity is not None:
            per_group = self.in_channels // self.groups
            identity = torch.zeros(self.in_channels, per_group, 3, 3, dtype=kernel.dtype)
            for channel in range(self.in_channels):
                identity[channel, channel % per_group, 1, 1] = 1
            kernel = kernel + identity
        return self._fuse_extra_bn_tensor(kernel, bias, self.bn)

    @staticmethod
    def _fuse_extra_bn_tensor(kernel, bias, norm):
        """The authors' fold of the BN after the sum: its running mean shifted by the sum's bias."""
        running_mean = norm.running_mean - bias
        std = (norm.running_var + norm.eps).sqrt()
        return kernel * (norm.weight / std).reshape(-1, 1, 1, 1), norm.bias - running_mean * norm.weight / std

    @torch.no_grad()
    def switch_to_deploy(self):
        if hasattr(self, "rbr_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        conv = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(
            conv.in_channels, conv.out_channels, 3, conv.stride, conv.padding, groups=conv.groups, bias=True
        )
        self.rbr_reparam.weight.data, self.rbr_reparam.bias.data = kernel, bias
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity", "bn"):
            if hasattr(self, name):
                delattr(self, name)
        self.deploy = True


class RepVGG(nn.Module):
    """The authors' (the official) RepVGG network: ``stage0`` of one block, four stages, ``gap``, ``linear``."""

    def __init__(
        self,
        num_blocks,
        num_classes=1000,
        width_multiplier=None,
        override_groups_map=None,
        deploy=False,
        block_cls=QARepVGGBlockV2,
    ):
        super().__init__()
        self.deploy = deploy
        self.override_groups_map = override_groups_map or {}
        self.in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = block_cls(3, self.in_planes, kernel_size=3, stride=2, padding=1, deploy=deploy)
        self.cur_layer_idx = 1
        for index, (base, count) in enumerate(zip((64, 128, 256, 512), num_blocks, strict=True), start=1):
            stage = self._make_stage(int(base * width_multiplier[index - 1]), count, 2, block_cls)
            setattr(self, f"stage{index}", stage)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(int(512 * width_multiplier[3]), num_classes)

    def _make_stage(self, planes, num_blocks, stride, block_cls):
        blocks = []
        for block_stride in [stride] + [1] * (num_blocks - 1):
            groups = self.override_groups_map.get(self.cur_layer_idx, 1)
            blocks.append(
                block_cls(self.in_planes, planes, 3, stride=block_stride, padding=1, groups=groups, deploy=self.deploy)
            )
            self.in_planes = planes
            self.cur_layer_idx += 1
        return nn.Sequential(*blocks)

    def forward(self, x):
        for index in range(5):
            x = getattr(self, f"stage{index}")(x)
        return self.linear(self.gap(x).flatten(1))


def repvgg_model_convert(model, do_copy=True):
    """The authors' conversion: ``switch_to_deploy`` on every module that has it, on a copy by default."""
    if do_copy:
        model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "switch_to_deploy"):
            module.switch_to_deploy()
    return model
