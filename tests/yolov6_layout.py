"""A compact re-creation of YOLOv6's re-parameterizable blocks (meituan/YOLOv6, yolov6/layers/common.py).

Written from YOLOv6's module layout and arithmetic at commit e86a483f3f6bded25d45970b56831345a99744a4
(yolov6/layers/common.py, yolov6/utils/torch_utils.py, yolov6/models/yolo.py). YOLOv6 is GPL-3.0:
nothing here is pasted from it; the classes are re-created in our own words and structure, keeping
only what makes its weights what they are: the state dict keys, shapes, forward order, fusion
arithmetic and BatchNorm settings. Tests then check loading across code bases against an
independent forward pass rather than against our own renaming.

- ``initialize_weights``: YOLOv6's ``Model.__init__`` ends with it, and it sets ``eps=1e-3`` and
  ``momentum=0.03`` on every ``nn.BatchNorm2d`` (exact type) of the network. Every YOLOv6 weights
  file was trained so; a state dict does not record eps. :func:`network` builds blocks the way
  YOLOv6's ``Model`` does, with it applied.

- ``RepVGGBlock``: ``rbr_dense`` and ``rbr_1x1`` are ConvModules (``conv`` without bias, ``bn``),
  ``rbr_identity`` a BatchNorm2d when shapes allow; ``relu(se(dense + 1x1 + identity))``.
- ``QARepVGGBlock``: ``rbr_1x1`` is a plain conv (key ``rbr_1x1.weight``, no BN, no bias),
  ``rbr_identity`` an ``nn.Identity`` (no weights) and ``bn`` a BatchNorm after the sum:
  ``relu(bn(se(dense + 1x1 + identity)))``.
- ``QARepVGGBlockV2``: as QARepVGGBlock plus ``rbr_avg``, a 3x3 ``AvgPool2d`` (stride 1,
  padding 1, ``count_include_pad=True``: every window divides by 9) that exists exactly when
  the identity does (``cin == cout`` and stride 1); it has no weights.

``se`` is always ``nn.Identity``: YOLOv6 raises NotImplementedError for ``use_se=True``, and so
does this file. Deploy form: ``rbr_reparam`` (biased 3x3); the QA blocks KEEP ``bn`` after it
(YOLOv6 keeps it for quantization-aware training). Like YOLOv6, a QA block built with
``deploy=True`` has no ``bn`` at all (its forward then fails): the usable deploy form of a QA block
is the one ``switch_to_deploy`` produces.

YOLOv6 fuses in two steps, and so does this file: ``fuse_model`` (yolov6/utils/torch_utils.py)
first folds every ConvModule's BN into a biased conv, then ``switch_to_deploy`` sums the already
folded kernels (it reads ``conv.weight``/``conv.bias`` and never looks at a ConvModule's BN).
``deploy(model)`` runs both, as YOLOv6's export and evaluation scripts do. One deliberate
difference: YOLOv6 builds the fused conv and the average-pool kernel in the default dtype
(float32); here they take the model's dtype, which is the same in float32 and exact in float64.
"""

import torch
import torch.nn.functional as F
from torch import nn


def initialize_weights(model):
    """YOLOv6's initialize_weights (yolov6/utils/torch_utils.py): BatchNorm eps 1e-3, momentum 0.03; in-place activations.

    Its convolutions keep PyTorch's own init (YOLOv6 passes on ``nn.Conv2d``).
    """
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.eps = 1e-3
            module.momentum = 0.03
        elif type(module) in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU):
            module.inplace = True
    return model


def network(*blocks):
    """A module holding YOLOv6 blocks as YOLOv6's ``Model`` holds them: built, then ``initialize_weights``."""
    return initialize_weights(nn.Sequential(*blocks))


class ConvModule(nn.Module):
    """YOLOv6's ConvModule without activation: ``conv`` (no bias) then ``bn``; ``bn`` gone once fused."""

    def __init__(self, cin, cout, kernel_size, stride, padding, groups):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.conv(x) if not hasattr(self, "bn") else self.bn(self.conv(x))


@torch.no_grad()
def _fuse_conv_and_bn(conv, bn):
    """YOLOv6's fuse_conv_and_bn arithmetic: diag(gamma / sqrt(eps + var)) @ W, bias through the same matrix."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        groups=conv.groups,
        bias=True,
        dtype=conv.weight.dtype,
    ).requires_grad_(False)
    scale = torch.diag(bn.weight.div(torch.sqrt(bn.eps + bn.running_var)))
    fused.weight.copy_(torch.mm(scale, conv.weight.view(conv.out_channels, -1)).view(fused.weight.shape))
    conv_bias = torch.zeros(conv.out_channels, dtype=conv.weight.dtype) if conv.bias is None else conv.bias
    bn_bias = bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps))
    fused.bias.copy_(torch.mm(scale, conv_bias.reshape(-1, 1)).reshape(-1) + bn_bias)
    return fused


def fuse_model(model):
    """YOLOv6's fuse_model: fold the BN of every ConvModule into its conv, in place."""
    for module in model.modules():
        if type(module) is ConvModule and hasattr(module, "bn"):
            module.conv = _fuse_conv_and_bn(module.conv, module.bn)
            del module.bn
    return model


def deploy(model):
    """What YOLOv6's export and evaluation do: fuse_model, then switch_to_deploy on every RepVGGBlock."""
    fuse_model(model)
    for module in model.modules():
        if isinstance(module, RepVGGBlock):
            module.switch_to_deploy()
    return model


def _identity_kernel(channels, groups, dtype):
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, 3, 3, dtype=dtype)
    for channel in range(channels):
        kernel[channel, channel % per_group, 1, 1] = 1
    return kernel


class RepVGGBlock(nn.Module):
    """YOLOv6's RepVGGBlock: 3x3 ConvModule + 1x1 ConvModule + BN identity, ReLU."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, padding=1, groups=1, deploy=False, use_se=False):
        super().__init__()
        if kernel_size != 3 or padding != 1:
            raise ValueError("YOLOv6's RepVGGBlock takes kernel_size=3 and padding=1 only")
        if use_se:
            raise NotImplementedError("se block not supported yet")  # YOLOv6's own message
        self.in_channels, self.groups, self.deploy = cin, groups, deploy
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
            self.rbr_dense = ConvModule(cin, cout, 3, stride, 1, groups)
            self.rbr_1x1 = ConvModule(cin, cout, 1, stride, 0, groups)

    def _branches(self, inputs):
        identity = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.rbr_dense(inputs) + self.rbr_1x1(inputs) + identity

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        return self.nonlinearity(self.se(self._branches(inputs)))

    @staticmethod
    def _folded_conv(module):
        if hasattr(module, "bn"):
            raise RuntimeError("run fuse_model first: YOLOv6's switch_to_deploy reads already folded ConvModules")
        return module.conv.weight, module.conv.bias

    def kernel_bias(self):
        """The summed kernel and bias of the branches (the ConvModules already folded by ``fuse_model``)."""
        kernel3, bias3 = self._folded_conv(self.rbr_dense)
        kernel1, bias1 = self._folded_conv(self.rbr_1x1)
        kernel_id, bias_id = 0, 0
        if self.rbr_identity is not None:
            norm = self.rbr_identity
            std = (norm.running_var + norm.eps).sqrt()
            eye = _identity_kernel(self.in_channels, self.groups, norm.weight.dtype)
            kernel_id, bias_id = (
                eye * (norm.weight / std).reshape(-1, 1, 1, 1),
                norm.bias - norm.running_mean * norm.weight / std,
            )
        return kernel3 + F.pad(kernel1, [1, 1, 1, 1]) + kernel_id, bias3 + bias1 + bias_id

    @torch.no_grad()
    def switch_to_deploy(self):
        """Swap the branches for ``rbr_reparam``; the QA blocks keep their ``bn``. A no-op when fused."""
        if hasattr(self, "rbr_reparam"):
            return
        kernel, bias = self.kernel_bias()
        geometry = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(
            geometry.in_channels,
            geometry.out_channels,
            3,
            geometry.stride,
            geometry.padding,
            geometry.dilation,
            geometry.groups,
            bias=True,
        )
        self.rbr_reparam.weight.data, self.rbr_reparam.bias.data = kernel, bias
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity", "rbr_avg"):
            if hasattr(self, name):
                delattr(self, name)
        self.deploy = True


class QARepVGGBlock(RepVGGBlock):
    """YOLOv6's QARepVGGBlock: 3x3 ConvModule + plain 1x1 conv + plain identity, then ``bn``, ReLU."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, padding=1, groups=1, deploy=False, use_se=False):
        super().__init__(cin, cout, kernel_size, stride, padding, groups, deploy, use_se)
        if not deploy:
            self.bn = nn.BatchNorm2d(cout)
            self.rbr_1x1 = nn.Conv2d(cin, cout, 1, stride, groups=groups, bias=False)
            self.rbr_identity = nn.Identity() if cout == cin and stride == 1 else None

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(inputs))))
        return self.nonlinearity(self.bn(self.se(self._branches(inputs))))

    def kernel_bias(self):
        """3x3 (folded) + padded 1x1 [+ average pool] + identity; the bias is the 3x3's alone."""
        kernel3, bias3 = self._folded_conv(self.rbr_dense)
        kernel = kernel3 + F.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        if getattr(self, "rbr_avg", None) is not None:
            kernel = kernel + self._avg_kernel(kernel)
        if self.rbr_identity is not None:
            kernel = kernel + _identity_kernel(self.in_channels, self.groups, kernel.dtype)
        return kernel, bias3

    def _avg_kernel(self, like):
        per_group = self.in_channels // self.groups
        kernel = torch.zeros(self.in_channels, per_group, 3, 3, dtype=like.dtype)
        for channel in range(self.in_channels):
            kernel[channel, channel % per_group] = 1.0 / 9
        return kernel

    def fold_post_bn(self, kernel, bias):
        """``bn`` folded into a fused kernel and bias: YOLOv6's unused ``_fuse_extra_bn_tensor``.

        YOLOv6 never calls it (it keeps ``bn``); the QARepVGG authors' ImageNet code
        (cxxgtxy/QARepVGG, repvgg.py) folds ``bn`` this way at deploy time.
        """
        norm = self.bn
        std = (norm.running_var + norm.eps).sqrt()
        scale = norm.weight / std
        return kernel * scale.reshape(-1, 1, 1, 1), norm.bias - (norm.running_mean - bias) * norm.weight / std


class QARepVGGBlockV2(QARepVGGBlock):
    """YOLOv6's QARepVGGBlockV2: QARepVGGBlock plus ``rbr_avg`` (3x3 average pool) where the identity exists."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, padding=1, groups=1, deploy=False, use_se=False):
        super().__init__(cin, cout, kernel_size, stride, padding, groups, deploy, use_se)
        if not deploy:
            self.rbr_avg = nn.AvgPool2d(3, stride, 1) if cout == cin and stride == 1 else None

    def _branches(self, inputs):
        average = 0 if self.rbr_avg is None else self.rbr_avg(inputs)
        return super()._branches(inputs) + average
